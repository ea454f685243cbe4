"""Queries the Lance table that `harma index export-lance` wrote with LanceDB's own Python
client and checks that its top-10 equals `harma search`'s for the same query vectors
(scripts/lance-proof.sh). Usage: lance_check.py URI TABLE ENDPOINT QUERY.json...
"""
import json
import sys

import lancedb


def main():
    uri, table, endpoint, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    db = lancedb.connect(uri, storage_options={
        "endpoint": endpoint, "allow_http": "true", "region": "us-east-1",
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
    })
    tbl = db.open_table(table)
    print(f"{uri} table {table}: {tbl.count_rows()} rows")
    bad = 0
    for f in files:
        with open(f) as fh:
            q = json.load(fh)
        ours = [(r["id"], r["score"]) for r in q["results"]]
        # exact search (no vector index on the table): the same candidates as ours
        rows = tbl.search(q["query_vector"]).distance_type("dot").limit(len(ours)).to_list()
        theirs = [(r["id"], 1.0 - r["_distance"]) for r in rows]
        same = [a[0] for a in ours] == [b[0] for b in theirs]
        if not same:
            # equal scores may come in either order: compare as sets with scores
            same = sorted(a[0] for a in ours) == sorted(b[0] for b in theirs) and all(
                abs(a[1] - b[1]) < 1e-5 for a, b in zip(ours, theirs))
        err = max(abs(a[1] - b[1]) for a, b in zip(ours, theirs)) if ours else 0.0
        print(f"{q['query']!r}: harma {[a[0] for a in ours]} lancedb {[b[0] for b in theirs]} "
              f"max score difference {err:.2e} {'EQUAL' if same else 'DIFFERENT'}")
        bad += not same
    if bad:
        sys.exit(f"{bad} of {len(files)} top-10s differ")
    print(f"all {len(files)} top-10s equal")


if __name__ == "__main__":
    main()
