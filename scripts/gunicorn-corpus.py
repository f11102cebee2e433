#!/usr/bin/env python3
"""Fetch gunicorn's HTTP request-parsing corpus from its source distribution on PyPI and turn its
expectations into data, for tests/conformance.rs.

The sdist (pinned by sha256, downloaded with pip, nothing installed) carries
`tests/requests/{valid,invalid}/*.http` and, beside each, a `.py` module with the expected
result. The modules are read with Python's `ast`, never imported or run: only literal values,
`uri("...")` calls, `cfg.set(name, value)` calls and names bound earlier in the same module are
understood, and anything else is an error. Output, under the destination directory:

    valid/NAME.http, valid/NAME.json      the request bytes as gunicorn stores them, and
    invalid/NAME.http, invalid/NAME.json  {"cfg": {...}, "expect_requests": [...]} or
                                          {"cfg": {...}, "expect_error": "ExceptionName"}
    LICENSE, NOTICE                       gunicorn's (MIT), kept with its data
    SOURCE                                what was fetched, and its sha256

Idempotent: does nothing when SOURCE already names the pinned sdist.

usage: gunicorn-corpus.py DEST_DIR
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse

PACKAGE = "gunicorn==27.0.1"
SDIST = "gunicorn-27.0.1.tar.gz"
SDIST_SHA256 = "b1514965361c8b7e8107a80aa2a92636878df1ccfac6dd204a676426e04d9e3e"


def split_request_uri(raw):
    """gunicorn's rule (gunicorn/util.py): a target starting with // is a path, not a host."""
    if raw.startswith("//"):
        parts = urllib.parse.urlsplit("." + raw)
        return parts._replace(path=parts.path[1:])
    return urllib.parse.urlsplit(raw)


def uri(raw):
    parts = split_request_uri(raw)
    return {
        "raw": raw,
        "path": parts.path or "",
        "query": parts.query or "",
        "fragment": parts.fragment or "",
    }


class Unsupported(Exception):
    pass


class ErrorName(str):
    """The name of a gunicorn exception class, the expected result of an invalid request."""


# Methods of str and bytes that the modules use to build long values; nothing else is called.
METHODS = {"decode", "encode", "replace"}


def evaluate(node, names, errors):
    """The value of an expression made of literals, names bound earlier, uri() calls and the
    string methods in METHODS."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [evaluate(e, names, errors) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {
            evaluate(k, names, errors): evaluate(v, names, errors)
            for k, v in zip(node.keys, node.values)
        }
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in errors:
            return ErrorName(node.id)
        raise Unsupported(f"unknown name {node.id}")
    if isinstance(node, ast.Call) and not node.keywords:
        args = [evaluate(a, names, errors) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id == "uri" and len(args) == 1:
            return uri(args[0])
        if isinstance(node.func, ast.Attribute) and node.func.attr in METHODS:
            receiver = evaluate(node.func.value, names, errors)
            if isinstance(receiver, (str, bytes)):
                return getattr(receiver, node.func.attr)(*args)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = evaluate(node.left, names, errors), evaluate(node.right, names, errors)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise Unsupported(f"expression {ast.dump(node)[:80]}")


def as_json(value):
    """Bytes become {"$bytes_latin1": text}; tuples become lists."""
    if isinstance(value, bytes):
        return {"$bytes_latin1": value.decode("latin-1")}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def expectation(source):
    """{"cfg": ..., "expect_requests"|"expect_error": ...} from one expectation module."""
    tree = ast.parse(source)
    names, errors, cfg = {}, set(), {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            if stmt.module == "gunicorn.http.errors":
                errors.update(a.asname or a.name for a in stmt.names)
            continue
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if not isinstance(target, ast.Name):
                raise Unsupported("assignment to something other than a name")
            value = stmt.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Config":
                continue  # cfg = Config()
            names[target.id] = evaluate(value, names, errors)
            continue
        if (
            isinstance(stmt, ast.Expr)
            and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Attribute)
            and getattr(stmt.value.func.value, "id", None) == "cfg"
            and stmt.value.func.attr == "set"
        ):
            key, value = (evaluate(a, names, errors) for a in stmt.value.args)
            cfg[key] = value
            continue
        raise Unsupported(f"statement {ast.dump(stmt)[:80]}")
    if "request" not in names:
        raise Unsupported("no `request =`")
    request = names["request"]
    if isinstance(request, ErrorName):
        return {"cfg": cfg, "expect_error": str(request)}
    requests = request if isinstance(request, list) else [request]
    return {"cfg": cfg, "expect_requests": as_json(requests)}


def fetch(cache):
    """The sdist, downloaded once into `cache` and checked by pip against the pinned hash."""
    path = os.path.join(cache, SDIST)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        req = os.path.join(cache, "requirements.txt")
        with open(req, "w") as f:
            f.write(f"{PACKAGE} --hash=sha256:{SDIST_SHA256}\n")
        print(f"fetching {PACKAGE} (sdist) from PyPI into {cache}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary=:all:", "--require-hashes",
             "-r", req, "-d", cache],
            check=True,
        )
    return path


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    dest = sys.argv[1]
    stamp = os.path.join(dest, "SOURCE")
    if os.path.exists(stamp) and SDIST_SHA256 in open(stamp).read():
        return
    sdist = fetch(os.path.join(os.path.dirname(os.path.abspath(dest)), ".sdist"))
    top = SDIST[: -len(".tar.gz")]
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dest)))
    try:
        counts = unpack(sdist, top, staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.replace(staging, dest)
    print(f"gunicorn corpus ready in {dest}: {counts}", file=sys.stderr)


def unpack(sdist, top, staging):
    """Write the corpus as data into `staging`; returns the case count per folder."""
    counts = {}
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in ("LICENSE", "NOTICE"):
            with tar.extractfile(members[f"{top}/{name}"]) as src, open(
                os.path.join(staging, name), "wb"
            ) as out:
                shutil.copyfileobj(src, out)
        for kind in ("valid", "invalid"):
            os.makedirs(os.path.join(staging, kind))
            prefix = f"{top}/tests/requests/{kind}/"
            for path in sorted(members):
                if not (path.startswith(prefix) and path.endswith(".http")):
                    continue
                stem = path[len(prefix) : -len(".http")]
                data = tar.extractfile(members[path]).read()
                source = tar.extractfile(members[prefix + stem + ".py"]).read().decode()
                try:
                    expect = expectation(source)
                except Unsupported as e:
                    raise SystemExit(f"{prefix}{stem}.py: {e}")
                with open(os.path.join(staging, kind, stem + ".http"), "wb") as out:
                    out.write(data)
                with open(os.path.join(staging, kind, stem + ".json"), "w") as out:
                    json.dump(expect, out, indent=1, ensure_ascii=False)
                counts[kind] = counts.get(kind, 0) + 1
    with open(os.path.join(staging, "SOURCE"), "w") as out:
        out.write(
            f"{PACKAGE} sdist {SDIST} sha256 {SDIST_SHA256}\n"
            f"tests/requests/valid: {counts.get('valid', 0)} cases, "
            f"tests/requests/invalid: {counts.get('invalid', 0)} cases\n"
        )
    return counts


if __name__ == "__main__":
    main()
