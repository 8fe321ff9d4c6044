import pytest
import torch

from unicodebook.utils.modules import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_gives_the_module_back_in_its_mode_even_after_an_error(training):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train(training)
    with eval_mode(net):
        assert not net.training and not net[1].training
    assert net.training is training and net[1].training is training
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        raise RuntimeError("inside")
    assert net.training is training and net[1].training is training
