#!/usr/bin/env python3
"""Print the kernel modules needed for the named ones, dependencies first.

usage: modules.py <modules-dir> <name>...

Debian's kernel package ships no modules.dep (depmod runs at install time), so the
dependencies are read from each module's .modinfo "depends=" string.
"""
import lzma
import os
import re
import sys


def main():
    moddir, wanted = sys.argv[1], sys.argv[2:]
    index = {}
    for root, _, files in os.walk(moddir):
        for f in files:
            if f.endswith((".ko", ".ko.xz")):
                index[f.split(".ko")[0].replace("-", "_")] = os.path.join(root, f)

    def depends(path):
        data = open(path, "rb").read()
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        m = re.search(rb"\0depends=([^\0]*)\0", data)
        if not m:
            return []
        return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]

    order = []

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in order:
            return
        if name in chain:
            sys.exit(f"modules.py: dependency loop through {name}")
        if name not in index:
            sys.exit(f"modules.py: module {name} not found under {moddir}")
        for dep in depends(index[name]):
            visit(dep, chain + [name])
        order.append(name)

    for w in wanted:
        visit(w, [])
    for name in order:
        print(index[name])


if __name__ == "__main__":
    main()
