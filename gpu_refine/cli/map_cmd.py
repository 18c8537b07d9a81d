"""Model map: the Fourier image of a model at a resolution, on a map's grid or a box.

gpu-refine map MODEL [MAP] resolution=D output=OUT.mrc [table=electron|xray] [labels=F,PHI]
"""
import logging

from ..checks import check_finite
from ..io import check_output
from ..maps import read_map, write_map
from ..model import read_batch
from ..workflows import compute_model_map
from .map_input import add_labels_argument, add_resolution_argument, default_resolution

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("model", help="model file (PDB or mmCIF); several MODELs are an "
                                      "ensemble, whose mean map is written")
    parser.add_argument("map", nargs="?",
                        help="map whose grid to use (MRC/CCP4 or MTZ); else a box")
    add_labels_argument(parser)
    add_resolution_argument(parser)
    parser.add_argument("--output", default="model_map.mrc", help="output map (MRC)")
    parser.add_argument("--table", default="electron", choices=["electron", "xray"],
                        help="scattering factors: electron (cryo-EM, default) or xray")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def main(args):
    default_resolution(args)
    check_output(args.output, args.overwrite, inputs=(args.model, args.map), kind="map")
    batch = read_batch(args.model, backend=args.backend)
    spec = read_map(args.map, labels=args.labels).spec if args.map else None
    maps, spec = compute_model_map(batch, args.resolution, spec, table=args.table,
                                   backend=args.backend)
    # The models of a multi-model file are an ensemble: its density is their mean.
    check_finite("model map value", maps)
    write_map(args.output, maps.mean(axis=0), spec, overwrite=args.overwrite)
    log.info("model map of %d atoms%s at %.2f Å on a %s grid written to %s",
             batch.model.n_atoms, f" (the mean of {batch.size} models)" if batch.size > 1
             else "", args.resolution, "x".join(map(str, spec.shape)), args.output)
