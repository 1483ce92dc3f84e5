"""Independent FHIR R4 (4.0.1) validation of chartmesh's exports, with fhir.resources 6.4.x.

Usage: validate.py FILE_OR_DIR...   Prints one line per file with the error, or "ok";
exits 0 only when every file parses as a valid R4 resource (each Bundle entry's resource
is validated against its own R4 model, including required elements and value types).
An `.ndjson` file (FHIR Bulk Data) holds one resource per line; every line is validated.
"""
import json
import pathlib
import sys

from fhir.resources import construct_fhir_element  # noqa: E402


def files(args):
    for a in args:
        p = pathlib.Path(a)
        if p.is_dir():
            yield from sorted(list(p.glob("*.json")) + list(p.glob("*.ndjson")))
        else:
            yield p


def main():
    bad = 0
    n = 0
    for f in files(sys.argv[1:]):
        n += 1
        try:
            text = f.read_text(encoding="utf-8")
            docs = [json.loads(l) for l in text.splitlines() if l.strip()] if f.suffix == ".ndjson" else [json.loads(text)]
            if not docs:
                raise ValueError("empty file")
            for data in docs:
                res = construct_fhir_element(data["resourceType"], data)
                # Re-serialise: catches values the model accepted but cannot write back.
                res.json()
            print(f"{f}: ok")
        except Exception as e:  # every failure is reported, never swallowed
            bad += 1
            msg = str(e).replace("\n", " | ")
            print(f"{f}: ERROR {msg}")
    print(f"validated {n} file(s), {bad} with errors")
    sys.exit(1 if bad or n == 0 else 0)


if __name__ == "__main__":
    main()
