"""Geometry report: restraint rmsd / rmsZ, outliers and nonbonded overlaps of a model.

gpu-refine geometry MODEL [monlib=DIR] [dictionary=FILE.cif] [json=OUT.json] [ignore_unknown=true]
                    [h_distances=electron|nucleus] [find_links=true|false]
                    [apply_all_trans=true|false]
"""
import json
import logging

from ..checks import check_finite_rows
from ..io import check_output, write_atomically
from ..model import read_batch
from ..restraints.topology import H_DISTANCES
from ..workflows.geometry import geometry_report
from .params import RESTRAINT_HELP, add_dictionary_arguments, boolean

log = logging.getLogger(__name__)

ROWS = [("bonds", "Å", "{:8.4f}"), ("angles", "°", "{:8.3f}"), ("torsions", "°", "{:8.3f}"),
        ("chirals", "Å³", "{:8.3f}"), ("planes", "Å", "{:8.4f}")]


def add_arguments(parser):
    parser.add_argument("model", help="model file (PDB or mmCIF); several MODELs are a batch")
    parser.add_argument("--monlib", help=RESTRAINT_HELP["monlib"])
    add_dictionary_arguments(parser)
    parser.add_argument("--h-distances", choices=H_DISTANCES, default=H_DISTANCES[0],
                        help=f"{RESTRAINT_HELP['h_distances']} (default {H_DISTANCES[0]})")
    parser.add_argument("--find-links", type=boolean, default=True, metavar="true|false",
                        help=f"{RESTRAINT_HELP['find_links']} (default true)")
    parser.add_argument("--apply-all-trans", type=boolean, default=False, metavar="true|false",
                        help=f"{RESTRAINT_HELP['apply_all_trans']} (default false)")
    parser.add_argument("--json", help="write the statistics as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _table(r):
    log.info("%-10s %7s %10s %8s %10s", "restraint", "count", "rmsd", "rmsZ", "max")
    for name, unit, fmt in ROWS:
        log.info("%-10s %7d %s %-2s %7.3f %s", name, r[f"n_{name}"],
                 fmt.format(r[f"rmsd_{name}"]), unit, r[f"rmsz_{name}"],
                 fmt.format(r[f"max_{name}"]))
    if "n_nonbonded" in r:
        w = r.get("worst_overlap")
        worst = (f"; worst {w['atoms'][0]} - {w['atoms'][1]} {w['distance']:.2f} Å "
                 f"(min {w['min_distance']:.2f})") if w else ""
        log.info("nonbonded  %7d pairs, %d overlaps%s", r["n_nonbonded"], r["n_overlaps"], worst)
    log.info("outliers (|Z| > 4): %d", r["n_outliers"])
    for o in r["outliers"][:10]:
        log.info("  %-8s %-60s model %9.3f ideal %9.3f %s  Z %6.1f", o["type"],
                 " - ".join(o["atoms"]), o["model"], o["ideal"], o["unit"], o["z"])


def main(args):
    if args.json:
        check_output(args.json, args.overwrite, inputs=(args.model,))
    batch = read_batch(args.model, backend=args.backend, dtype="float64")
    xyz = batch.backend.to_numpy(batch.xyz)
    topology, results = geometry_report(batch.model, monlib=args.monlib,
                                        dictionaries=args.dictionary,
                                        ignore_unknown=args.ignore_unknown, xyz=xyz,
                                        h_distances=args.h_distances,
                                        find_links=args.find_links,
                                        apply_all_trans=args.apply_all_trans,
                                        backend=args.backend)
    check_finite_rows(results)
    links = ", ".join(f"{k} {v}" for k, v in sorted(topology.links.items()))
    log.info("restraints from %s; links: %s", topology.library, links or "none")
    for i, r in enumerate(results, start=1):
        if len(results) > 1:
            log.info("model %d", i)
        _table(r)
    if args.json:
        for r in results:
            r["library"] = topology.library
            r["links"] = dict(topology.links)
            r["n_unrestrained_atoms"] = len(topology.unrestrained)
        payload = results[0] if len(results) == 1 else {"models": results}
        write_atomically(args.json, json.dumps(payload, indent=1).encode(),
                         overwrite=args.overwrite)
        log.info("statistics written to %s", args.json)
