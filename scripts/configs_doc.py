"""
Write docs/configs.md's table of every config key from the declarations (config.py, keys.py).

    python scripts/configs_doc.py           # rewrites the table between the page's markers
    python scripts/configs_doc.py --check   # exit 1 if the page is behind the declarations
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from common import HelpFormatter  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
BEGIN, END = "<!-- every key: python scripts/configs_doc.py writes this part -->", "<!-- end of every key -->"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say whether the page is in step")
    args = ap.parse_args(argv)
    text = PAGE.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n\n{config.markdown()}\n{END}{tail}"
    if args.check:
        print("docs/configs.md is in step" if new == text else "docs/configs.md is behind: run scripts/configs_doc.py")
        return 0 if new == text else 1
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
