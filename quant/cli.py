"""Not built yet; it says so instead of pretending to work."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("fanformer-quantize: not built yet; see the project's issues", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
