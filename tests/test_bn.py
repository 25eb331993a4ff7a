import math

import pytest
import timm
import torch
from torch.distributions import Normal

from gzq.bn import BNStatsRecorder, bn_losses, channel_moments, gaussian_stat_log_likelihood, gaussian_stat_nll
from gzq.config import BNLoss, NRule, VRule


def _bn_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    model.train()
    with torch.no_grad():                       # give the BN layers non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 1.5 + 0.3)
    return model.eval()


def test_gaussian_stat_log_likelihood_matches_torch_distributions():
    torch.manual_seed(1)
    c, n = 7, 37
    mu, sigma2 = torch.randn(c), torch.rand(c) + 0.1
    mu_hat, var_hat = mu + 0.3 * torch.randn(c), sigma2 * (1 + 0.2 * torch.randn(c)).abs()
    v = 2 * sigma2.pow(2)
    ref = (Normal(mu, (sigma2 / n).sqrt()).log_prob(mu_hat)
           + Normal(sigma2, (v / n).sqrt()).log_prob(var_hat))
    got = gaussian_stat_log_likelihood(mu_hat, var_hat, mu, sigma2, n, v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the loss is the NLL up to the (parameter-free) normaliser
    norm = -0.5 * (math.log(2 * math.pi) + torch.log(sigma2 / n)) - 0.5 * (math.log(2 * math.pi) + torch.log(v / n))
    torch.testing.assert_close(gaussian_stat_nll(mu_hat, var_hat, mu, sigma2, n, v), norm - ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (9, 4), (4, 2, 3)])
def test_channel_moments_match_var_mean_with_gradients(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 30).requires_grad_(True)   # mean >> std: cancellation
    dims = [0] + list(range(2, x.ndim))
    var_ref, mean_ref = torch.var_mean(x, dims, unbiased=False)
    shift = torch.full((shape[1],), 29.0, dtype=torch.float64)
    mean, var = channel_moments(x, shift)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)
    torch.autograd.gradcheck(lambda t: channel_moments(t, shift), (x,))
    torch.autograd.gradcheck(lambda t: channel_moments(t), (x,))
    # float32 with a shift near the mean keeps the variance accurate despite the large offset
    mean32, var32 = channel_moments(x.detach().float(), shift.float())
    torch.testing.assert_close(var32.double(), var_ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_rule", list(NRule))
@pytest.mark.parametrize("v_rule", list(VRule))
def test_bn_losses_equal_independent_reference(n_rule, v_rule):
    model = _bn_model()
    x = torch.randn(6, 3, 32, 32)
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
               for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with BNStatsRecorder(model, need_m4=v_rule == VRule.EMPIRICAL) as rec:
        model(x)
        loss, layer_ll = bn_losses(rec, BNLoss.LIKELIHOOD, n_rule, v_rule)
        names = [n for n, _ in rec.layers]
    for h in handles:
        h.remove()
    ref_ll, ref_nll = [], []
    for name in names:
        bn = model.get_submodule(name)
        a = inputs[name].double()                                    # (B, C, H, W)
        b, c, h, w = a.shape
        n = b * h * w if n_rule == NRule.BATCH_SPATIAL else b
        flat = a.permute(1, 0, 2, 3).reshape(c, -1)                  # (C, B*H*W)
        mu_hat, var_hat = flat.mean(1), flat.var(1, unbiased=False)
        mu, sigma2 = bn.running_mean.double(), bn.running_var.double() + bn.eps
        if v_rule == VRule.EMPIRICAL:
            v = ((flat - mu_hat[:, None]) ** 4).mean(1) - var_hat ** 2
            v = torch.maximum(v, 1e-3 * sigma2 ** 2)
        else:
            v = 2 * sigma2 ** 2
        lp = Normal(mu, (sigma2 / n).sqrt()).log_prob(mu_hat) + Normal(sigma2, (v / n).sqrt()).log_prob(var_hat)
        ref_ll.append(lp.mean())
        ref_nll.append((n * (mu_hat - mu) ** 2 / (2 * sigma2) + n * (var_hat - sigma2) ** 2 / (2 * v)).mean())
    torch.testing.assert_close(layer_ll.double(), torch.stack(ref_ll), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(loss.double(), torch.stack(ref_nll).mean(), rtol=1e-4, atol=1e-4)


def test_mse_loss_is_deepinversion_norm_and_hooks_are_removed():
    model = _bn_model()
    x = torch.randn(4, 3, 32, 32)
    with BNStatsRecorder(model) as rec:
        model(x)
        loss, _ = bn_losses(rec, BNLoss.MSE)
        ref = torch.stack([torch.norm(s.mean - bn.running_mean) + torch.norm(s.var - bn.running_var)
                           for (_, bn), s in zip(rec.layers, rec.stats)]).mean()
        kept = list(rec.stats)
        rec.paused = True   # a paused recorder leaves the statistics of the last forward alone
        model(x * 3 + 1)
        assert all(a is b for a, b in zip(rec.stats, kept))
    torch.testing.assert_close(loss, ref)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_likelihood_is_higher_for_matching_statistics():
    """Activations drawn with the running statistics score higher than shifted ones."""
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 2.0]))
    model = torch.nn.Sequential(bn)
    good = bn.running_mean.view(1, 4, 1, 1) + bn.running_var.sqrt().view(1, 4, 1, 1) * torch.randn(64, 4, 8, 8)
    lls = []
    with BNStatsRecorder(model) as rec:
        for x in (good, good * 2 + 1):
            model(x)
            lls.append(bn_losses(rec, BNLoss.LIKELIHOOD)[1].item())
    assert lls[0] > lls[1]
