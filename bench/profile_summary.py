"""``python -m bench.profile_summary profile.txt [--top N] [--match TEXT]``: read py-spy raw output.

py-spy's ``--format raw`` writes one collapsed stack a line (``frame;frame;... count``).
This prints where the samples go: self time per function, and inclusive time
per function (each function counted once per stack), optionally only for
frames whose text contains ``--match``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)`` with the package kept for the project."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [short(f) for f in stack.split(";") if f]
        stacks.append((frames, n))
    return stacks


def summarize(path: Path, top: int = 25, match: str = "") -> str:
    stacks = read(path)
    total = sum(n for _, n in stacks) or 1
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    for frames, n in stacks:
        # The leaf frame is the last one (py-spy: root first). Thread names come first.
        if frames:
            self_time[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{path.name}: {total} samples"]
    lines.append(f"\nself time (top {top}):")
    for frame, n in self_time.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
    lines.append(f"\ninclusive time (top {top}{', matching ' + match if match else ''}):")
    shown = 0
    for frame, n in inclusive.most_common():
        if match and match not in frame:
            continue
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    print(summarize(args.path, args.top, args.match))


if __name__ == "__main__":
    main()
