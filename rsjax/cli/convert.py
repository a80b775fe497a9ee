"""``rsjax convert SRC OUT_DIR``: a PyTorch smoothing checkpoint -> an rsjax model directory.

Detects the checkpoint format (cohen | macer | smoothadv | torchvision), the architecture, the
dataset, the normalisation and the training sigma, prints what it detected, and writes an orbax
checkpoint of the Flax variables plus ``rsjax_model.json``. See converters/pytorch.py. The file is
read with PyTorch's weights-only unpickler, which never runs code from it; ``--trust-checkpoint``
lifts that for a file you trust.
"""

from converters.pytorch import FORMATS, NORMALIZATIONS
from rsjax.data import DATASET_INFO
from rsjax.errors import RsjaxError


def add_parser(parser, name):
    parser.add_argument("src", metavar="SRC", help="PyTorch checkpoint (.pth / .pth.tar)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the converted model to")
    parser.add_argument("--arch", help="architecture: cifar_resnet{20,32,44,56,110}, resnet50 or lenet "
                                        "(default: detected from the tensors)")
    parser.add_argument("--dataset", choices=sorted(DATASET_INFO),
                        help="dataset, which sets mean/std (default: from the path, else the architecture's)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="checkpoint format (default: detected)")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="auto",
                        help="input normalisation inside the model: meanstd = (x-mean)/std (Cohen "
                             "NormalizeLayer), center = x-mean (SmoothAdv InputCenterLayer), none (MACER); "
                             "auto: by format and dataset (default)")
    parser.add_argument("--sigma", type=float, help="training noise sigma to record (default: from the path, "
                                                    "e.g. noise_0.25 or 0.25.pth)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds a converted model")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a file the weights-only loader refuses with full unpickling: this runs arbitrary "
                             "code from the file; only for files you trust")
    parser.set_defaults(func=run)


def run(args):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RsjaxError("converting needs PyTorch: pip install 'rsjax[torch]'") from None
    from converters.pytorch import convert_checkpoint

    convert_checkpoint(args.src, args.out_dir, arch=args.arch, dataset=args.dataset, fmt=args.fmt,
                       normalization=args.normalization, sigma=args.sigma, overwrite=args.overwrite,
                       trust=args.trust_checkpoint,
                       log=lambda line: print(line, flush=True))
    return 0
