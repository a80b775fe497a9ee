"""``rsjax export MODEL_DIR OUT.pth.tar --format cohen|macer`` (converters.export)."""


def add_parser(p, name="export"):
    p.add_argument("model_dir", help="an rsjax model directory (rsjax convert / rsjax train OUTDIR/model)")
    p.add_argument("out", help="the PyTorch checkpoint to write, e.g. checkpoint.pth.tar")
    p.add_argument("--format", default="cohen", choices=("cohen", "macer"),
                   help="cohen: {'epoch', 'arch', 'state_dict'} with the '1.' prefix; macer: {'net', 'epoch'}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run)


def run(args):
    from converters.export import export_checkpoint

    obj = export_checkpoint(args.model_dir, args.out, args.format, overwrite=args.overwrite)
    sd = obj["state_dict"] if args.format == "cohen" else obj["net"]
    print(f"wrote {args.out}: {args.format} layout, {len(sd)} tensors, epoch {obj['epoch']}")
    return 0
