"""The library apart from its demo: nitrokernels.nitro (the NitroFusion API) imports nothing of nitrokernels.digits
(the digits demo: data, assets, `nitrokernels demo`), and the demo's old paths under nitrokernels.nitro still work,
as the same module objects, with a DeprecationWarning that names the new path and points at the importing line."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("diffusers")

MOVED = {"nitrokernels.nitro.demo": "nitrokernels.digits.demo", "nitrokernels.nitro.digits": "nitrokernels.digits.data"}
LIBRARY = ("nitrokernels.nitro.discriminator", "nitrokernels.nitro.distiller", "nitrokernels.nitro.distributed",
           "nitrokernels.nitro.pipeline", "nitrokernels.nitro.plots", "nitrokernels.nitro.sampling",
           "nitrokernels.nitro.scheduler", "nitrokernels.nitro.generate", "nitrokernels.nitro.distill_cli")


def _fresh_import(name: str):
    for key in [k for k in sys.modules if k == name]:
        del sys.modules[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_path_is_the_new_module_with_a_warning(old, new):
    module, caught = _fresh_import(old)
    assert module is importlib.import_module(new) and sys.modules[old] is module
    assert len(caught) == 1 and new in str(caught[0].message) and old in str(caught[0].message)
    assert caught[0].filename == __file__, caught[0].filename  # the warning points at the importer, not at importlib


def test_from_package_import_of_an_old_name_warns_and_resolves():
    sys.modules.pop("nitrokernels.nitro.digits", None)
    sys.modules["nitrokernels.nitro"].__dict__.pop("digits", None)
    with pytest.warns(DeprecationWarning, match="nitrokernels.digits.data"):
        from nitrokernels.nitro import digits
    from nitrokernels.digits import data

    assert digits is data and digits.DIGITS_UNET_CONFIG is data.DIGITS_UNET_CONFIG


def test_new_paths_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); "
            "import nitrokernels.digits.demo, nitrokernels.digits.data, nitrokernels.cli")
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:nitrokernels", "-c", code],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_library_does_not_import_the_demo():
    code = (f"import sys, importlib\nfor m in {LIBRARY!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.startswith('nitrokernels.digits')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr[-2000:])


def test_the_demo_assets_live_in_the_demo_package():
    from nitrokernels.digits import data

    folder = os.path.join(os.path.dirname(data.__file__), "assets")
    assert data.ASSETS_DIR == folder
    for asset in (data.TEACHER_ASSET, data.STUDENT_ASSET, data.CLASSIFIER_ASSET):
        assert os.path.isfile(data.asset_path(asset)) and data.asset_path(asset).startswith(folder)


def test_one_grid_writer(tmp_path):
    """The demo's grid writer is the library's: same pixels, and the row-groups form concatenates."""
    import numpy as np
    import torch
    from PIL import Image

    from nitrokernels.digits import data
    from nitrokernels.nitro.distiller import image_grid, save_image_grid

    images = torch.rand(13, 1, 16, 16) * 2.2 - 1.1  # out of range on purpose: both clamp
    a = data.save_grid_png(str(tmp_path / "a.png"), [images[:7], images[7:]], nrow=5, scale=3)
    b = save_image_grid(images, str(tmp_path / "b.png"), nrow=5, scale=3)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    grid = data.sample_grid(images, nrow=5)
    assert np.array_equal(grid, image_grid(images, nrow=5)) and grid.shape == (3 * 17 + 1, 5 * 17 + 1)
    tile = ((images[6, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(grid[18:34, 1 + 17:17 + 17], tile)  # image 6: row 1, column 1
