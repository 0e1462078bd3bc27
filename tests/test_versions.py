"""The package floors: requirements.txt claims only what was tested, and the README names the tested sets."""
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def floors():
    """{package: floor version string} from requirements.txt's `name>=version` lines (comments ignored)."""
    out = {}
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        for line in f:
            match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", line.split("#")[0])
            if match:
                out[match.group(1).lower()] = match.group(2)
    return out


def version_tuple(text):
    """'2.6' -> (2, 6, 0): compares as numbers, not strings ('2.10' > '2.6')."""
    parts = [int(p) for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def test_torch_floor_has_safe_weights_only_loading():
    """torch >= 2.6.0: before it, torch.load(weights_only=True), which minisnr relies on to open strangers'
    checkpoints, could still run code from a crafted file (CVE-2025-32434)."""
    found = floors()
    assert "torch" in found, "requirements.txt names no torch floor (torch>=X)"
    assert version_tuple(found["torch"]) >= (2, 6, 0), f"torch>={found['torch']} allows unsafe weights_only loading"


def test_readme_names_the_tested_floors():
    """README's 'Tested versions' paragraph names every requirements.txt floor as a version the suite ran on."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        paragraphs = [" ".join(p.split()) for p in f.read().split("\n\n")]
    tested = [p for p in paragraphs if p.startswith("Tested versions")]
    assert len(tested) == 1, "README.md needs one paragraph starting 'Tested versions'"
    for name, floor in floors().items():
        assert re.search(rf"\b{re.escape(name)} {re.escape(floor)}(\.0)*(?![.\d])", tested[0], re.IGNORECASE), \
            f"README's tested versions do not include {name} {floor} (requirements.txt's floor)"
