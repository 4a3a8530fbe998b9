"""The sample-quality classifier tells digits from non-digits (it can fail: accuracy and shares
are measured on real test digits and on images that are not digits)."""

import pytest
import torch

from engine import data
from engine.experiments import sample_quality as sq


def test_classifier_is_accurate_and_confident_only_on_digits(tmp_path):
    recipe = {**sq.RECIPE, "epochs": 2}
    net = sq.load_classifier(tmp_path, recipe)
    assert sq.test_accuracy(net) > 0.85
    x, y = data.load_test()
    digits = sq.confident_share(net, x[:256])
    assert digits["share"] > 0.35 and sum(digits["histogram"]) == round(digits["share"] * 256)
    noise = sq.confident_share(net, torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert noise["share"] < 0.5 * digits["share"]
    # cached: the second load reads the same weights instead of training again
    again = sq.load_classifier(tmp_path, recipe)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_outliers_are_the_kinds_they_say():
    x = data.load_test()[0][:8]
    kinds = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    o = sq.outliers(x, torch.Generator().manual_seed(0), kinds)
    assert o.shape == x.shape and o.min() >= 0 and o.max() <= 1
    # noise fills the image; the three binary kinds hold only 0 and 1
    assert (o[0] > 0).float().mean() > 0.99 and set(o[1].unique().tolist()) <= {0.0, 1.0}
    assert set(o[2].unique().tolist()) <= {0.0, 1.0}
    # shuffled patches: the digit's own 7x7 patches, all of them, in another order
    patches = lambda im: sorted(tuple(p.flatten().tolist()) for p in im[0].unfold(0, 7, 7).unfold(1, 7, 7).reshape(16, 7, 7))
    assert patches(o[3]) == patches(x[3]) and not torch.equal(o[3], x[3])


def test_outlier_exposure_stops_confidence_off_digits(tmp_path):
    """Trained alike on digits, the classifier that also saw non-digits (target uniform) is
    confident on almost none of fresh ones made from held-out test digits, while the one that
    saw digits only is confident on many; both stay accurate and confident on test digits."""
    x = data.load_test()[0]
    kinds = torch.arange(len(sq.OUTLIER_KINDS)).repeat_interleave(64)
    fakes = sq.outliers(x[data.query_indices(len(kinds), 11)], torch.Generator().manual_seed(1), kinds)
    plain = sq.load_classifier(tmp_path, {**sq.RECIPE, "epochs": 4})
    strict = sq.load_strict(tmp_path, {**sq.STRICT, "epochs": 4}, seeds=(0, 1))
    for net in (plain, strict):
        assert sq.test_accuracy(net) > 0.9
        assert sq.confident_share(net, x[:256])["share"] > 0.6
    assert sq.confident_share(plain, fakes)["share"] > 0.1
    assert sq.confident_share(strict, fakes)["share"] < 0.02


def test_ensemble_probability_is_the_members_mean():
    torch.manual_seed(0)
    nets = [sq._net().eval() for _ in range(3)]
    x = torch.rand(5, 1, 28, 28)
    mean = torch.stack([sq.probabilities(n, x) for n in nets]).mean(0)
    assert torch.allclose(sq.probabilities(sq.Ensemble(nets), x), mean, atol=1e-6)


def _experiment():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "experiments/sample_quality.py"
    spec = importlib.util.spec_from_file_location("sample_quality_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [16, 64])
def test_grid_labels_sit_clear_of_the_images_and_the_title(n):
    """Every sample's label lies above its own image, inside the figure, and overlaps no image
    and not the title (two rows once put the second row's labels over the first row's images)."""
    import matplotlib.pyplot as plt
    import numpy as np
    x = np.random.default_rng(0).random((n, 1, 28, 28))
    r = {"labels": [3] * n, "confidence": [0.5] * n}
    fig = _experiment().grid_figure(x, r["labels"], r["confidence"], "a run\nsde sampler: 0% labelled", r)
    renderer = fig.canvas.get_renderer()
    axes = fig.axes[:n]
    images = [ax.get_images()[0].get_window_extent(renderer) for ax in axes]
    head = fig._suptitle.get_window_extent(renderer)
    page = fig.bbox
    for i, ax in enumerate(axes):
        label = ax.title.get_window_extent(renderer)
        assert page.x0 <= label.x0 and label.x1 <= page.x1 and label.y1 <= page.y1
        assert label.y0 >= images[i].y1 - 1 and not label.overlaps(head)
        assert not any(label.overlaps(im) for im in images)
    plt.close(fig)


@pytest.mark.parametrize("k,n", [(0, 64), (3, 64), (48, 64), (202, 256), (64, 64)])
def test_share_interval_is_the_95_percent_wilson_interval(k, n):
    import math
    z, p = 1.959963984540054, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = _experiment().interval(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-9) and hi == pytest.approx(min(1.0, centre + half), abs=1e-9)
