"""Independent due-list computation for the test suite (standard library only).

Usage: oracle.py CHARTS.jsonl TODAY WITHIN_DAYS  -> JSON {rule: [due, overdue]} on stdout.
Implements the rules of docs/CLINICAL.md from their description, separately from the Rust code.
"""
import calendar
import datetime as dt
import json
import sys

RULES = [
    # id, ("cond", prefixes) | ("age", min, max), ("obs"|"imm", codes), every_months | None
    ("hba1c-diabetes", ("cond", ["E11"]), ("obs", ["4548-4"]), 6),
    ("bp-hypertension", ("cond", ["I10"]), ("obs", ["8480-6"]), 12),
    ("tsh-hypothyroidism", ("cond", ["E03"]), ("obs", ["3016-3"]), 12),
    ("lipids-hyperlipidemia", ("cond", ["E78"]), ("obs", ["2093-3"]), 12),
    ("annual-checkup", ("age", 18, 200), ("obs", ["8480-6", "8867-4", "29463-7", "8310-5"]), 12),
    ("mmr-child", ("age", 1, 18), ("imm", ["03"]), None),
    ("influenza-65", ("age", 65, 200), ("imm", ["141"]), 12),
    ("pneumococcal-65", ("age", 65, 200), ("imm", ["133"]), None),
]


def date(s):
    return dt.date.fromisoformat(s[:10])


def plus_months(d, n):
    m = d.month - 1 + n
    y, m = d.year + m // 12, m % 12 + 1
    return dt.date(y, m, min(d.day, calendar.monthrange(y, m)[1]))


def age(birth, today):
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def main():
    path, today, within = sys.argv[1], date(sys.argv[2]), int(sys.argv[3])
    horizon = today + dt.timedelta(days=within)
    counts = {r[0]: [0, 0] for r in RULES}
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        c = json.loads(line)
        birth = date(c["patient"]["birthDate"])
        a = age(birth, today)
        for rid, applies, (kind, codes), every in RULES:
            if applies[0] == "cond":
                hits = [x for x in c.get("conditions", [])
                        if x.get("status", "active") == "active"
                        and any(x["code"].startswith(p) for p in applies[1])]
                if not hits:
                    continue
                since = date(hits[0]["onset"]) if hits[0].get("onset") else today
            else:
                if not (applies[1] <= a < applies[2]):
                    continue
                since = plus_months(birth, applies[1] * 12)
            if kind == "obs":
                dates = [date(o["date"]) for o in c.get("observations", []) if o["code"] in codes]
            else:
                dates = [date(i["date"]) for i in c.get("immunizations", []) if i.get("code") in codes]
            last = max(dates) if dates else None
            if last is not None and every is None:
                continue
            due = plus_months(last, every) if last is not None else since
            if due > horizon:
                continue
            counts[rid][0] += 1
            if due < today:
                counts[rid][1] += 1
    json.dump(counts, sys.stdout)


if __name__ == "__main__":
    main()
