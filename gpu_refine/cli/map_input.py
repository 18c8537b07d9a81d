"""The MAP argument of the commands that read one: an MRC/CCP4 map, or MTZ map coefficients
(named by ``labels=``; their d_min is the default resolution)."""
from ..maps import map_resolution


def add_labels_argument(parser):
    parser.add_argument("--labels", default=None,
                        help="MTZ map coefficients F,PHI (default FWT,PHWT or 2FOFCWT,PH2FOFCWT)")


def add_resolution_argument(parser):
    parser.add_argument("--resolution", type=float,
                        help="resolution d in Å (required; an MTZ's d_min by default)")


def default_resolution(args):
    """Fill args.resolution from MTZ map coefficients where it is not given."""
    if args.resolution is None and args.map:
        args.resolution = map_resolution(args.map)
