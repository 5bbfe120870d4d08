"""Adds PyPI's sha256 of every file of each pinned release to a lock file, for
`pip install --require-hashes` (build.sh): a package whose bytes differ from what PyPI published
when the lock was written is refused.

    python3 models/hash_lock.py models/requirements.lock models/requirements-torch.lock

Each `name==version` line (its hashes, if any, replaced) gets the hashes of all the release's
files on PyPI (every wheel and the sdist: pip picks the one for the machine). Comments are kept.
Standard library only; reads https://pypi.org/simple/ (PEP 691 JSON).
"""

import json
import re
import sys
import urllib.request


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release_of(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (normalize(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            return (normalize(name), version) if name else None
    return None


def hashes(name: str, version: str) -> list[str]:
    req = urllib.request.Request(f"https://pypi.org/simple/{normalize(name)}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as res:
        files = json.load(res)["files"]
    want = (normalize(name), version)
    found = sorted({f["hashes"]["sha256"] for f in files if release_of(f["filename"]) == want and "sha256" in f["hashes"]})
    if not found:
        raise SystemExit(f"{name}=={version}: no file of that release on PyPI")
    return found


def rewrite(path: str) -> None:
    out = []
    lines = open(path).read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        # a pin and its continuation lines (old hashes) form one entry
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
        if not pin:
            out.append(line)
            continue
        name, version = pin.groups()
        found = hashes(name, version)
        out.append(f"{name}=={version} \\")
        out.extend(f"    --hash=sha256:{h}" + (" \\" if k + 1 < len(found) else "") for k, h in enumerate(found))
        print(f"{name}=={version}: {len(found)} files", file=sys.stderr)
    with open(path + ".partial", "w") as f:
        f.write("\n".join(out) + "\n")
    import os
    os.replace(path + ".partial", path)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for p in sys.argv[1:]:
        rewrite(p)
