"""Write the bundled example: an ideal helix (helix.cif) and its simulated 3 Å map (helix_3A.mrc).

gpu-refine example [directory=example]
"""
import logging
import os

from ..examples import make_example
from ..io import check_output
from ..maps import write_map
from ..model import write_model

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--directory", default="example", help="where to write the files")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def main(args):
    model_path = os.path.join(args.directory, "helix.cif")
    map_path = os.path.join(args.directory, "helix_3A.mrc")
    for path in (model_path, map_path):
        check_output(path, args.overwrite)
    model, data, spec = make_example(backend=args.backend)
    write_model(model_path, model.structure, overwrite=args.overwrite)
    write_map(map_path, data, spec, overwrite=args.overwrite)
    log.info("example written: %s (%d atoms), %s (3.0 Å, %s grid)", model_path, model.n_atoms,
             map_path, "x".join(map(str, spec.shape)))
