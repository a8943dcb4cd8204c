"""The README and docs/ as a newcomer uses them: the snippets run, every relative link resolves."""

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_pipeline_snippets_run_on_files_of_their_names(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use it in your TorchIO / MONAI pipeline") :]
    blocks = python_blocks(section.split("\n## ", 1)[0])
    assert len(blocks) == 2
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 6)], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = ((radius < 0.7).astype(np.int16) + (radius < 0.35)).astype(np.int16)
    affine = np.diag([1.2, 1.1, 4.0, 1.0])
    nib.save(
        nib.Nifti1Image((label * 50.0 + 5).astype(np.float32), affine), tmp_path / "case.nii.gz"
    )
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "case_gt.nii.gz")
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    field = nib.load(tmp_path / "field.nii.gz")
    assert field.shape == (40, 36, 6, 1, 3) and np.allclose(field.affine, affine)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
