#!/usr/bin/env python3
"""Compare two folders written by scripts/scenarios.sh, file by file.

Safetensors files: the header (dtypes, shapes, metadata) and every tensor's bytes must be equal.
JSON / JSON-lines / TOML / text: equal after leaving out what differs between any two runs of
the same binary (wall-clock times, dates, process-dependent figures, absolute paths, the
binary's build commit); pictures and pages (report .html/.md/.svg) likewise. Prints each
difference and exits 1 if there is one. Standard library only.
"""
import json, os, re, struct, sys

VOLATILE_KEYS = {
    "seconds", "elapsed", "time", "started", "finished", "date", "peak_memory", "phases",
    "pairs_per_second", "images_per_second", "load", "build", "commit", "host", "threads",
    "machine", "sessions", "cpu", "rss", "modified", "mtime",
}
VOLATILE_TEXT = [
    (re.compile(r"\d+(\.\d+)?\s*(s|ms|min|h|GB|MB|GiB|MiB|KB|pairs/s|images/s)\b"), "<measure>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?(\.\d+)?(Z|[+-]\d\d:?\d\d| UTC)?"), "<date>"),
    (re.compile(r"[0-9a-f]{40}"), "<commit>"),
    # the build's short commit (run pages' sessions and footers)
    (re.compile(r"(\d+\.\d+\.\d+ \(|commit )([0-9a-f]{12}|unknown)\b"), r"\1<commit>"),
    (re.compile(r"\b\d+%"), "<share>"),
    # the training speed row of a comparison page (Markdown, and HTML cells)
    (re.compile(r"\| pairs/s \(training\) \|[^\n]*"), "| pairs/s (training) | <speed>"),
    (re.compile(r"(<td>pairs/s \(training\)</td>)(<td>[^<]*</td>)+"), r"\1<speed>"),
    (re.compile(r'"mtime_ns": ?\d+'), '"mtime_ns": <time>'),
    # an evaluation page's "part | seconds" rows
    (re.compile(r"\| ([a-z (),]+) \| \d+\.\d+ \|"), r"| \1 | <seconds> |"),
    (re.compile(r"<td>([a-z (),]+)</td><td>\d+\.\d+</td>"), r"<td>\1</td><td><seconds></td>"),
]


def scrub_json(v, roots):
    if isinstance(v, dict):
        return {k: scrub_json(x, roots) for k, x in v.items() if k not in VOLATILE_KEYS}
    if isinstance(v, list):
        return [scrub_json(x, roots) for x in v]
    if isinstance(v, str):
        return scrub_text(v, roots)
    return v


def scrub_text(t, roots):
    for r, name in roots:
        t = t.replace(r, name)
    for pat, rep in VOLATILE_TEXT:
        t = pat.sub(rep, t)
    return t


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        return header, f.read()


def compare(a, b, rel, roots):
    ext = os.path.splitext(rel)[1]
    if ext == ".safetensors":
        (ha, da), (hb, db) = safetensors(a), safetensors(b)
        meta_a = scrub_json(ha.pop("__metadata__", {}), roots[0])
        meta_b = scrub_json(hb.pop("__metadata__", {}), roots[1])
        if ha != hb:
            return "tensor names, dtypes, shapes or offsets differ"
        if meta_a != meta_b:
            return f"metadata differs: {meta_a} vs {meta_b}"
        if da != db:
            bad = [k for k, v in ha.items() if da[v["data_offsets"][0]:v["data_offsets"][1]]
                   != db[v["data_offsets"][0]:v["data_offsets"][1]]]
            return f"tensor bytes differ: {bad[:8]}"
        return None
    if ext == ".sqlite":
        da = [(tb, tuple(scrub_text(v, roots[0]) if isinstance(v, str) else v for v in r))
              for tb, r in sqlite_rows(a)]
        db = [(tb, tuple(scrub_text(v, roots[1]) if isinstance(v, str) else v for v in r))
              for tb, r in sqlite_rows(b)]
        return None if da == db else f"rows differ: {sorted(set(da) ^ set(db))[:4]}"
    ta = open(a, "rb").read()
    tb = open(b, "rb").read()
    if ta == tb:
        return None
    try:
        ta, tb = ta.decode(), tb.decode()
    except UnicodeDecodeError:
        return "binary files differ"
    if ext == ".json":
        try:
            if scrub_json(json.loads(ta), roots[0]) == scrub_json(json.loads(tb), roots[1]):
                return None
        except json.JSONDecodeError:
            pass
    if ext == ".jsonl":
        la = [scrub_json(json.loads(l), roots[0]) for l in ta.splitlines() if l]
        lb = [scrub_json(json.loads(l), roots[1]) for l in tb.splitlines() if l]
        return None if la == lb else "JSON lines differ"
    sa, sb = scrub_text(ta, roots[0]), scrub_text(tb, roots[1])
    if sa == sb:
        return None
    la, lb = sa.splitlines(), sb.splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"line {i + 1}: {x[:160]!r} vs {y[:160]!r}"
    return f"{len(la)} vs {len(lb)} lines"


def sqlite_rows(path):
    """Every row of every table, the files' times left out (they are when the files were made)."""
    import sqlite3
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = []
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
        cur = con.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cur.description]
        keep = [i for i, n in enumerate(names) if "time" not in n]
        for r in cur:
            rows.append((table, tuple(r[i] for i in keep)))
    con.close()
    return sorted(rows, key=repr)


def files(root):
    out = set()
    for d, _, fs in os.walk(root):
        for f in fs:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def main():
    a, b = sys.argv[1], sys.argv[2]
    roots = ([(os.path.realpath(a), "<out>"), (a, "<out>")],
             [(os.path.realpath(b), "<out>"), (b, "<out>")])
    fa, fb = files(a), files(b)
    bad = 0
    for rel in sorted(fa ^ fb):
        print(f"only in {'first' if rel in fa else 'second'}: {rel}")
        bad += 1
    same = 0
    for rel in sorted(fa & fb):
        if rel.endswith(("-wal", "-shm")):
            continue
        why = compare(os.path.join(a, rel), os.path.join(b, rel), rel, roots)
        if why:
            print(f"{rel}: {why}")
            bad += 1
        else:
            same += 1
    print(f"{same} files equal, {bad} differences")
    sys.exit(1 if bad else 0)


main()
