#!/usr/bin/env python3
"""The longest functions of the Rust sources, by lines from `fn` to its closing brace (test
modules excluded). Used to track the arbiter's readability:

    python3 scripts/longest-functions.py [N] [paths...]   # default: 5, src workers/src
"""
import os
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("#[cfg(test)]"):
            break  # unit tests sit at the end of each file
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j].split("//")[0])
            depth += code.count("{") - code.count("}")
            started = started or "{" in code
            if started and depth <= 0:
                break
            if not started and code.rstrip().endswith(";"):
                break  # a declaration without a body
            j += 1
        if started:
            out.append((j - i + 1, m.group(5), path, i + 1))
        i = j + 1 if started else i + 1
    return out


def main():
    args = sys.argv[1:]
    n = int(args.pop(0)) if args and args[0].isdigit() else 5
    roots = args or ["src", "workers/src"]
    found = []
    for root in roots:
        if os.path.isfile(root):
            found += functions(root)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".rs"):
                    found += functions(os.path.join(dirpath, f))
    for length, name, path, line in sorted(found, reverse=True)[:n]:
        print(f"{length:4} lines  {name}  ({path}:{line})")


if __name__ == "__main__":
    main()
