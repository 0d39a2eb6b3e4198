"""`python -m gmem` / `gmem`: the command line."""
import argparse
import sys


def cmd_demo(args):
    from gmem import demo
    return demo.run(plot=not args.no_plot, out=args.out)


def build_parser():
    p = argparse.ArgumentParser(prog="gmem", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the default scenario and print what happened")
    d.add_argument("--no-plot", action="store_true", help="do not write the memory-map PNG")
    d.add_argument("--out", default="gmem-demo.png", help="where to write the PNG")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
