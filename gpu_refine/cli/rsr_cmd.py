"""Real-space refinement of a model, or a batch of starts, against a map.

gpu-refine rsr MODEL MAP resolution=D [output.prefix=P]
    [strategy=minimization_global+resolution_annealing+adp]
    [weight=W | weight=W1,W2,...] [nmodels=B shake=RMS seed=S] [macro_cycles=5]
    [adp=individual|group] [h_distances=electron|nucleus] [table=electron|xray]
    [labels=F,PHI] [find_links=true|false] [apply_all_trans=true] [output.pdb=true]
    [--overwrite]
The starts are MODEL's models (every MODEL of a multi-model file), each in nmodels copies
(shaken by shake Å rms), each copy refined with each weight of a grid.  Writes P.cif (a batch
as MODEL 1..B, plus P_best.cif), P.log, P.json and P.params, and with output.pdb=true P.pdb
(and P_best.pdb); rerun with ``gpu-refine rsr P.params`` (further key=value arguments override
it).
"""
import contextlib
import json
import logging
import logging.handlers
import os
import time

import numpy as np

from .. import __version__
from ..maps import read_map
from ..model import check_pdb_format, read_batch, structures_as_models, write_model
from ..errors import GpuRefineError
from ..io import check_output, output_lock, write_atomically
from ..workflows.rsr import RealSpaceRefinement, RSRSettings, check_finite_result
from .map_input import add_labels_argument, default_resolution
from .params import RESTRAINT_HELP, add_dictionary_arguments, boolean

log = logging.getLogger(__name__)

# command-line option -> RSRSettings field: (type, help)
SETTINGS = {
    "resolution": (float, "map resolution d in Å (required; an MTZ's d_min by default)"),
    "strategy": (str, "minimization_global (sites), +adp, +occupancy; for a start placed "
                      "off: +resolution_annealing (sites at 6 and 4.5 Å first), "
                      "+simulated_annealing (Langevin dynamics at a falling temperature), "
                      "+rigid_body (each chain as one body, first)"),
    "adp": (str, "individual | group (one B per residue)"),
    "precondition": (boolean, "sites in the variables of the restraints' Laplacian (true)"),
    "macro_cycles": (int, "cycles of sites, then ADP, then occupancy"),
    "weight": (str, "map weight for sites: W, or a grid W1,W2,... (each copy refined with "
                    "each); automatic if not given"),
    "target": (str, "sites target: cc (model map against the map in the mask) | map_value "
                    "(map at the atoms, phenix's simple target)"),
    "nmodels": (int, "copies of each starting model"),
    "shake": (float, "Å rms random shift of each copy"),
    "seed": (int, "random seed of the shifts and of simulated annealing"),
    "annealing_steps": (int, "simulated annealing: Langevin steps of each model"),
    "annealing_temperature": (float, "simulated annealing: the first kT, in restraint units "
                                     "(1: a bond fluctuates by sigma/sqrt 2), falling to 0"),
    "sites_iterations": (int, "L-BFGS iterations of sites per macro-cycle"),
    "adp_iterations": (int, "L-BFGS iterations of ADP and of occupancy per macro-cycle"),
    "adp_weight": (float, "map weight for ADP against the B restraints"),
    "bond_limit": (float, "Å: the automatic weight keeps rmsd(bonds) at or below this"),
    "angle_limit": (float, "°: the automatic weight keeps rmsd(angles) at or below this"),
    "weight_trials": (int, "trial weights of the automatic search, a factor 2 apart"),
    "weight_iterations": (int, "L-BFGS iterations of each trial weight"),
    "regularize_iterations": (int, "restraints-only L-BFGS iterations on each start first "
                                   "(0: none)"),
    "mask_radius": (float, "Å around the atoms where the map is fitted"),
    "mask_edge": (float, "Å of the mask's cosine edge"),
    "cushion": (float, "Å of map boxed beyond the mask"),
    "monlib": (str, RESTRAINT_HELP["monlib"]),
    "h_distances": (str, RESTRAINT_HELP["h_distances"] + " (default nucleus with "
                         "table=electron, as Servalcat; electron with table=xray)"),
    "table": (str, "scattering factors: electron (cryo-EM) | xray"),
    "find_links": (boolean, RESTRAINT_HELP["find_links"]),
    "apply_all_trans": (boolean, RESTRAINT_HELP["apply_all_trans"]),
}


def add_arguments(parser):
    parser.add_argument("model", help="model file (PDB or mmCIF); several MODELs are several "
                                      "starts")
    parser.add_argument("map", help="map (MRC/CCP4), placed by its ORIGIN / NSTART; or MTZ "
                                    "map coefficients (see --labels)")
    add_labels_argument(parser)
    defaults = RSRSettings()
    for name, (kind, text) in SETTINGS.items():
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                            help=text if default is None else f"{text} (default {default})")
    add_dictionary_arguments(parser)
    parser.add_argument("--output.prefix", dest="prefix", default=None,
                        help="output prefix (default: MODEL name + _rsr)")
    parser.add_argument("--output.pdb", dest="pdb", action="store_true",
                        help="also write P.pdb (and P_best.pdb for a batch)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _prefix(args):
    return args.prefix or os.path.splitext(os.path.basename(args.model.replace(".gz", "")))[0] \
        + "_rsr"


def _outputs(args, prefix, n_models):
    names = {"cif": prefix + ".cif", "log": prefix + ".log", "json": prefix + ".json",
             "params": prefix + ".params"}
    if n_models > 1:
        names["best"] = prefix + "_best.cif"
    if args.pdb:
        names["pdb"] = prefix + ".pdb"
        if n_models > 1:
            names["best_pdb"] = prefix + "_best.pdb"
    # A log alone is what a failed or interrupted run leaves (its outputs are removed): it
    # does not block the rerun, which replaces it.
    others = [path for key, path in names.items() if key != "log"]
    log_alone = os.path.exists(names["log"]) and not any(map(os.path.exists, others))
    for key, path in names.items():
        check_output(path, args.overwrite or (key == "log" and log_alone),
                     inputs=(args.model, args.map))
    return names, log_alone


def _reason(exc):
    """How a run stopped, as the last line of its log says it."""
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted"
    if isinstance(exc, GpuRefineError):
        return f"error: {exc}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"internal error: {exc.__class__.__name__}: {exc}"


def _params_text(args, settings, result):
    lines = [f"# gpu-refine {__version__} rsr, effective parameters "
             f"({time.strftime('%Y-%m-%d %H:%M')}); rerun: gpu-refine rsr THIS_FILE",
             os.path.abspath(args.model), os.path.abspath(args.map)]
    for name in SETTINGS:
        value = getattr(settings, name)
        if name == "weight" and value is None:
            lines.append(f"# weight: automatic (chose {float(result.weight[0]):.6g})")
        elif name == "weight":
            lines.append("weight=" + ",".join(map(str, settings.weight_grid())))
        elif value is not None:
            lines.append(f"{name}={value}")
    if args.labels:
        lines.append(f"labels={args.labels}")
    lines += [f"dictionary={d}" for d in settings.dictionaries]
    if settings.ignore_unknown:
        lines.append("ignore_unknown=true")
    return "\n".join(lines) + "\n"


def main(args):
    # Parameters and inputs (the files, the dictionary for every residue, the map's overlap
    # with the model) are checked before any output exists, so that a mistake leaves nothing
    # behind.  What the setup logs is held and written to the log once it has succeeded.
    default_resolution(args)
    settings = RSRSettings(**{k: getattr(args, k) for k in SETTINGS},
                           dictionaries=list(args.dictionary),
                           ignore_unknown=args.ignore_unknown).check()
    starts = read_batch(args.model, backend="numpy", dtype=np.float64)
    if args.pdb:
        check_pdb_format(starts.model.structure)
    prefix = _prefix(args)
    with output_lock(prefix):
        names, replaced_log = _outputs(
            args, prefix, starts.size * settings.nmodels * len(settings.weight_grid()))
        job, records = _set_up(args, starts, settings)
        handler = _open_log(args, names["log"], records, replaced_log)
        written = []
        try:
            _run(args, names, settings, job, written)
        except BaseException as exc:
            # Nothing of a failed run stays but its log, which ends saying why.
            for path in written:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            handler.stream.write(f"gpu-refine: stopped: {_reason(exc)}"
                                 + (f"; removed {', '.join(written)}" if written else "")
                                 + "\n")
            raise
        finally:
            logging.getLogger("gpu_refine").removeHandler(handler)
            handler.close()


def _set_up(args, starts, settings):
    """(the job, the log records of setting it up): held, so that a setup that fails (no
    dictionary, a map that misses the model) leaves no log behind."""
    root = logging.getLogger("gpu_refine")
    held = logging.handlers.BufferingHandler(capacity=1 << 20)
    root.addHandler(held)
    try:
        if starts.size > 1:
            log.info("%s: %d models, each a start", args.model, starts.size)
        map_data = read_map(args.map, labels=args.labels)
        job = RealSpaceRefinement(starts.model, map_data, settings, backend=args.backend,
                                  starts=starts)
    finally:
        root.removeHandler(held)
        records = list(held.buffer)
        held.close()
    return job, records


def _open_log(args, path, records, replaced):
    """The run's log file, begun with its header and the setup's ``records``, and attached."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.stream.write(f"gpu-refine {__version__} | device: {args.device}\n"
                         f"command: {args.command_line}\n")
    if replaced:
        handler.stream.write(f"(replaces the log of a run that stopped: {path})\n")
    for record in records:
        handler.handle(record)
    logging.getLogger("gpu_refine").addHandler(handler)
    return handler


def _run(args, names, settings, job, written):
    """Refine, then write the outputs, each added to ``written`` once it exists."""
    result = job.run()
    check_finite_result(result)
    structures = result.batch.to_structures()
    payload = {"version": __version__, "device": args.device, "command": args.command_line,
               "resolution": settings.resolution, "strategy": settings.strategy,
               "best_model": result.best + 1, "time": round(result.time, 2),
               "phases": {k: round(v, 2) for k, v in result.phases.items()},
               "weight_trials": result.weight_trials, "models": result.stats}
    batch, best = structures_as_models(structures), structures[result.best]
    saves = {
        "cif": lambda path: write_model(path, batch, overwrite=args.overwrite),
        "best": lambda path: write_model(path, best, overwrite=args.overwrite),
        "json": lambda path: write_atomically(path, json.dumps(payload, indent=1).encode(),
                                              overwrite=args.overwrite),
        "params": lambda path: write_atomically(
            path, _params_text(args, settings, result).encode(), overwrite=args.overwrite),
        "pdb": lambda path: write_model(path, batch, fmt="pdb", overwrite=args.overwrite),
        "best_pdb": lambda path: write_model(path, best, fmt="pdb", overwrite=args.overwrite),
    }
    for key, save in saves.items():
        if key in names:
            save(names[key])
            written.append(names[key])
    log.info("wrote %s", ", ".join(names.values()))
