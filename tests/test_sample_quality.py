"""The sample-quality classifier tells digits from non-digits (it can fail: accuracy and shares
are measured on real test digits and on images that are not digits)."""

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
