"""Validate a model against a map: CCmask, CCbox, CCpeaks, CCvolume and per-residue CC.

gpu-refine validate MODEL MAP resolution=D [json=OUT.json] [table=electron|xray] [labels=F,PHI]
"""
import json
import logging

import numpy as np

from ..checks import check_finite
from ..io import check_output, write_atomically
from ..maps import read_map
from ..model import read_batch
from ..workflows import validate
from .map_input import add_labels_argument, add_resolution_argument, default_resolution

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("model", help="model file (PDB or mmCIF); several MODELs are a batch")
    parser.add_argument("map", help="map (MRC/CCP4), or MTZ map coefficients (see --labels)")
    add_labels_argument(parser)
    add_resolution_argument(parser)
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--table", default="electron", choices=["electron", "xray"],
                        help="scattering factors: electron (cryo-EM, default) or xray")
    parser.add_argument("--atom-radius", type=float, default=None,
                        help="radius (Å) for per-residue CC; default from the atom image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def main(args):
    default_resolution(args)
    if args.json:
        check_output(args.json, args.overwrite, inputs=(args.model, args.map))
    batch = read_batch(args.model, backend=args.backend)
    map_data = read_map(args.map, labels=args.labels)
    results = validate(batch, map_data, args.resolution, table=args.table, backend=args.backend,
                       atom_radius=args.atom_radius)
    for key in ("cc_mask", "cc_box", "cc_peaks", "cc_volume"):
        check_finite(key, [[r[key]] for r in results])
    log.info("%-6s %8s %8s %8s %8s", "model", "CCmask", "CCbox", "CCpeaks", "CCvolume")
    for i, r in enumerate(results, start=1):
        log.info("%-6d %8.4f %8.4f %8.4f %8.4f", i, r["cc_mask"], r["cc_box"], r["cc_peaks"],
                 r["cc_volume"])
    worst = sorted((x for x in results[0]["per_residue"] if x["cc"] is not None),
                   key=lambda x: x["cc"])[:5]
    if worst:
        log.info("lowest per-residue CC (model 1, radius %.2f Å): %s", results[0]["atom_radius"],
                 ", ".join(f"{x['chain']}/{x['resname']} {x['resseq']} {x['cc']:.2f}" for x in worst))
    if args.json:
        payload = results[0] if len(results) == 1 else {"models": results}
        write_atomically(args.json, json.dumps(payload, indent=1, default=_plain).encode(),
                         overwrite=args.overwrite)
        log.info("results written to %s", args.json)


def _plain(x):
    return x.item() if isinstance(x, np.generic) else str(x)
