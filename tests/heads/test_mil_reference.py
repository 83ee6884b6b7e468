"""The MIL heads' networks against their reference code: same weights, same outputs.

* TransMIL: STAMP's ``trans_mil.py`` (KatherLab/STAMP c54ce0673962, MIT licence, Copyright (c) 2023 Omar El
  Nahhas; "adapted from" szc19990412/TransMIL ``models/TransMIL.py``), ported below as it is, on lucidrains'
  ``nystrom_attention`` package (the module the TransMIL reference imports); and mmcli's Nystrom port against
  that package.
* DSMIL: binli123/dsmil-wsi ``dsmil.py`` (80465ed534ac, MIT licence, Copyright (c) 2020 Bin Li), ported below
  as it is (``FCLayer``, ``BClassifier``, ``MILNet``), with the dual-stream loss of its ``train_tcga.py``.
* CLAM: mahmoodlab/CLAM ``models/model_clam.py`` is GPL-3.0, so its code is not copied into this Apache-2.0
  repository; :func:`clam_one_bag` restates its forward and ``inst_eval`` / ``inst_eval_out`` for one bag from
  the paper's definitions (Lu et al. 2021, Methods), with its tensor layout (A: K x N).

Every network is also checked on padded, masked mini-batches: a bag's output may not depend on the padding
or on the other bags of its batch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmcli.heads.models.clam import CLAMNet, clustering_loss
from mmcli.heads.models.dsmil import DSMILNet
from mmcli.heads.models.transmil import TransMILNet
from mmcli.heads.nn.nystrom import NystromAttention

nystrom_attention = pytest.importorskip("nystrom_attention")  # the dev extra installs it


# ---- STAMP's TransMIL (MIT), on the nystrom_attention package ------------------------------------------------------
class RefTransformer(nn.Module):
    def __init__(self, norm_layer=nn.LayerNorm, dim=512):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = nystrom_attention.NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2,
                                                       pinv_iterations=6, residual=True, dropout=0.1)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class RefPPEG(nn.Module):
    def __init__(self, dim=512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x, H, W):
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((cls_token.unsqueeze(1), x), dim=1)
        return x


class RefTransMIL(nn.Module):
    def __init__(self, dim_output: int, dim_input: int, dim_hidden: int):
        super().__init__()
        self.pos_layer = RefPPEG(dim=dim_hidden)
        self._fc1 = nn.Sequential(nn.Linear(dim_input, dim_hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim_hidden))
        self.n_classes = dim_output
        self.layer1 = RefTransformer(dim=dim_hidden)
        self.layer2 = RefTransformer(dim=dim_hidden)
        self.norm = nn.LayerNorm(dim_hidden)
        self._fc2 = nn.Linear(dim_hidden, self.n_classes)

    def forward(self, h, return_cls_attention=False):
        h = self._fc1(h)
        H = h.shape[1]
        _H = _W = int(np.ceil(np.sqrt(H)))
        add_length = _H * _W - H
        h = torch.cat([h, h[:, :add_length, :]], dim=1)
        B = h.shape[0]
        cls_tokens = self.cls_token.expand(B, -1, -1).to(h.device)
        h = torch.cat((cls_tokens, h), dim=1)
        if return_cls_attention:  # the full n x n attention of layer 1 (the package's return_attn), class-token row
            _, attn = self.layer1.attn(self.layer1.norm(h), return_attn=True)
            pad = attn.shape[-1] - h.shape[1]
            return attn[0, :, pad, pad:].mean(0)
        h = self.layer1(h)
        h = self.pos_layer(h, _H, _W)
        h = self.layer2(h)
        h = self.norm(h)[:, 0]
        return self._fc2(h)


# ---- dsmil-wsi dsmil.py (MIT, Copyright (c) 2020 Bin Li) ---------------------------------------------------------
class FCLayer(nn.Module):
    def __init__(self, in_size, out_size=1):
        super(FCLayer, self).__init__()  # noqa: UP008 - the reference code as it is
        self.fc = nn.Sequential(nn.Linear(in_size, out_size))

    def forward(self, feats):
        x = self.fc(feats)
        return feats, x


class BClassifier(nn.Module):
    def __init__(self, input_size, output_class, dropout_v=0.0, nonlinear=True, passing_v=False):  # K, L, N
        super(BClassifier, self).__init__()  # noqa: UP008 - the reference code as it is
        if nonlinear:
            self.q = nn.Sequential(nn.Linear(input_size, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh())
        else:
            self.q = nn.Linear(input_size, 128)
        if passing_v:
            self.v = nn.Sequential(
                nn.Dropout(dropout_v),
                nn.Linear(input_size, input_size),
                nn.ReLU()
            )
        else:
            self.v = nn.Identity()
        self.fcc = nn.Conv1d(output_class, output_class, kernel_size=input_size)

    def forward(self, feats, c):  # N x K, N x C
        device = feats.device
        V = self.v(feats)  # N x V, unsorted
        Q = self.q(feats).view(feats.shape[0], -1)  # N x Q, unsorted
        _, m_indices = torch.sort(c, 0, descending=True)
        m_feats = torch.index_select(feats, dim=0, index=m_indices[0, :])
        q_max = self.q(m_feats)
        A = torch.mm(Q, q_max.transpose(0, 1))
        A = F.softmax(A / torch.sqrt(torch.tensor(Q.shape[1], dtype=torch.float32, device=device)), 0)
        B = torch.mm(A.transpose(0, 1), V)
        B = B.view(1, B.shape[0], B.shape[1])  # 1 x C x V
        C = self.fcc(B)  # 1 x C x 1
        C = C.view(1, -1)
        return C, A, B


class MILNet(nn.Module):
    def __init__(self, i_classifier, b_classifier):
        super(MILNet, self).__init__()  # noqa: UP008 - the reference code as it is
        self.i_classifier = i_classifier
        self.b_classifier = b_classifier

    def forward(self, x):
        feats, classes = self.i_classifier(x)
        prediction_bag, A, B = self.b_classifier(feats, classes)
        return classes, prediction_bag, A, B


# ---- CLAM, restated for one bag ------------------------------------------------------------------------------------
def clam_one_bag(net: CLAMNet, h: torch.Tensor, label: int, k: int, subtyping: bool):
    """(logits (1, C), A_raw (K, N), instance loss) of one embedded bag h (N, H) as CLAM_SB / CLAM_MB compute
    them: gated attention scores, softmax over the N instances, M = A h, the bag classifier(s); for the label's
    class the top-k instances of its branch are positives and the bottom-k negatives of its instance
    classifier; with ``subtyping`` the other classes' classifiers take their branch's top-k as negatives and the
    loss is averaged over the classes."""
    A_raw = net.attention_c(net.attention_a(h) * net.attention_b(h)).T  # K x N
    A = torch.softmax(A_raw, dim=1)
    M = A @ h  # K x H
    if net.multi_branch:
        logits = torch.stack([net.classifiers[c](M[c])[0] for c in range(len(net.classifiers))])[None]
    else:
        logits = net.classifiers(M)
    loss = torch.zeros(())
    for i, clf in enumerate(net.instance_classifiers):
        a = A[i if net.multi_branch else 0]
        if i == label:
            ids = torch.cat([torch.topk(a, k)[1], torch.topk(-a, k)[1]])
            loss = loss + F.cross_entropy(clf(h[ids]), torch.tensor([1] * k + [0] * k))
        elif subtyping:
            loss = loss + F.cross_entropy(clf(h[torch.topk(a, k)[1]]), torch.zeros(k, dtype=torch.long))
    if subtyping:
        loss = loss / len(net.instance_classifiers)
    return logits, A_raw, loss


# ---- helpers -------------------------------------------------------------------------------------------------------
D, H = 12, 64
NO_SCALE = (torch.zeros(D), torch.ones(D))  # the in-fold standardisation as identity: embed = Linear-ReLU


def _padded(bags: list[torch.Tensor], junk: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags padded to one length with junk values (which the mask must hide) and their mask."""
    n = max(len(b) for b in bags)
    x = torch.full((len(bags), n, D), junk)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def _bags(seed: int, lengths=(1, 5, 9, 30, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for n in lengths]


# ---- Nystrom attention -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 32, 33, 100])
def test_nystrom_port_matches_the_package_on_one_sequence(n):
    torch.manual_seed(0)
    ref = nystrom_attention.NystromAttention(dim=H, dim_head=8, heads=8, num_landmarks=32, pinv_iterations=6,
                                             residual=True, dropout=0.1).eval()
    mine = NystromAttention(H, dim_head=8, heads=8, num_landmarks=32, pinv_iterations=6, dropout=0.1).eval()
    mine.load_state_dict(ref.state_dict())  # same parameter names
    x = torch.randn(1, n, H)
    with torch.no_grad():
        out_ref, (r1, r2, r3) = ref(x, return_attn_matrices=True)
        out, (a1, a2, a3) = mine(x, return_attn_matrices=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for a, r in ((a1, r1), (a2, r2), (a3, r3)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_nystrom_port_gives_each_sequence_of_a_batch_its_own_output_where_the_package_does_not():
    torch.manual_seed(1)
    mine = NystromAttention(H, dim_head=8, heads=8, num_landmarks=8).eval()
    ref = nystrom_attention.NystromAttention(dim=H, dim_head=8, heads=8, num_landmarks=8).eval()
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(2, 20, H)
    x[1] *= 5.0  # other row and column sums: the package's batch-wide pseudo-inverse scale moves
    with torch.no_grad():
        alone = torch.cat([mine(x[:1]), mine(x[1:])])
        torch.testing.assert_close(mine(x), alone, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ref(x)[0], ref(x[:1])[0], rtol=1e-5, atol=1e-6)


# ---- TransMIL ------------------------------------------------------------------------------------------------------
def _transmil_pair(n_out: int = 3) -> tuple[TransMILNet, RefTransMIL]:
    torch.manual_seed(2)
    mine = TransMILNet(D, H, n_out, heads=8, landmarks=H // 2, pinv_iterations=6, dropout=0.1).eval()
    ref = RefTransMIL(n_out, D, H).eval()
    state = {k.replace("fc1.linear.", "_fc1.0.").replace("fc2.", "_fc2."): v for k, v in mine.state_dict().items()}
    ref.load_state_dict(state)  # every parameter maps one to one
    return mine, ref


def test_transmil_matches_stamps_reference_port_bag_by_bag_and_in_padded_batches():
    mine, ref = _transmil_pair()
    bags = _bags(3)
    with torch.no_grad():
        want = torch.cat([ref(b[None]) for b in bags])
        got, att = mine(*_padded(bags), *NO_SCALE)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (att[_padded(bags)[1]] >= 0).all() and (att[~_padded(bags)[1]] == 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones(len(bags)))


def test_transmil_attention_is_the_class_token_row_of_the_first_layers_full_nystrom_attention():
    mine, ref = _transmil_pair()
    for n in (4, 10, 30):  # 10 and 30: square padding copies the first instances
        b = _bags(4, (n,))[0]
        with torch.no_grad():
            row = ref(b[None], return_cls_attention=True)[1:]  # drop the class token itself
            _, att = mine(*_padded([b]), *NO_SCALE)
        want = row[:n].clone()
        side = math.ceil(math.sqrt(n))
        want[: side * side - n] += row[n:]
        want = want.clamp(min=0)
        torch.testing.assert_close(att[0], want / want.sum(), rtol=1e-4, atol=1e-6)


# ---- DSMIL ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonlinear, passing_v, n_out", [(True, False, 2), (False, True, 3), (True, True, 1)])
def test_dsmil_matches_the_reference_milnet_bag_by_bag_and_in_padded_batches(nonlinear, passing_v, n_out):
    torch.manual_seed(5)
    mine = DSMILNet(D, H, 128, n_out, dropout=0.0, nonlinear=nonlinear, passing_v=passing_v,
                    scalar=n_out == 1).eval()
    ref = MILNet(FCLayer(H, n_out), BClassifier(H, n_out, nonlinear=nonlinear, passing_v=passing_v)).eval()
    ref.i_classifier.fc[0].load_state_dict(mine.i_classifier.state_dict())
    ref.b_classifier.q.load_state_dict(mine.q.state_dict())
    ref.b_classifier.v.load_state_dict(mine.v.state_dict())
    ref.b_classifier.fcc.load_state_dict(mine.fcc.state_dict())
    bags = _bags(6)
    x, mask = _padded(bags)
    with torch.no_grad():
        logits, shown, aux = mine(x, mask, *NO_SCALE)
        for i, b in enumerate(bags):
            feats = mine.embed(b, *NO_SCALE)
            classes, bag, A, _ = ref(feats)
            crit, _ = torch.max(classes, 0)  # train_tcga.py's max_prediction
            n = len(b)
            torch.testing.assert_close(aux["instances"][i, :n], classes, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux["bag"][i], bag[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux["max"][i], crit, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux["A"][i, :n], A, rtol=1e-5, atol=1e-6)
            assert (aux["A"][i, n:] < 1e-6).all()
            if n_out == 1:  # survival: the mean of the two streams' risks
                torch.testing.assert_close(logits[i], 0.5 * (bag[0] + crit), rtol=1e-5, atol=1e-6)
            else:  # the mean of the two streams' probabilities (test(): sigmoid of each stream, averaged)
                p = 0.5 * (torch.softmax(bag[0], 0) + torch.softmax(crit, 0))
                torch.testing.assert_close(torch.softmax(logits[i], 0), p, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(shown[i, :n], A[:, p.argmax()], rtol=1e-5, atol=1e-6)


# ---- CLAM ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multi_branch, subtyping, n_out", [(False, False, 2), (True, False, 2), (False, True, 3),
                                                            (True, True, 3)])
def test_clam_matches_the_one_bag_definition_in_padded_batches(multi_branch, subtyping, n_out):
    torch.manual_seed(7)
    net = CLAMNet(D, H, 32, n_out, n_out, dropout=0.0, gate=True, multi_branch=multi_branch).eval()
    bags = _bags(8, (3, 9, 30, 16))
    labels = torch.tensor([0, 1, n_out - 1, 1])
    x, mask = _padded(bags)
    with torch.no_grad():
        logits, shown, aux = net(x, mask, *NO_SCALE)
        inst = clustering_loss(net, aux["scores"], aux["h"], mask, labels, k_sample=4, subtyping=subtyping)
        for i, b in enumerate(bags):
            h = net.fc(b, *NO_SCALE)
            k = min(4, len(b) // 2)  # 3 instances: k = 1 (the reference's topk would fail for k = 4)
            want_logits, A_raw, want_loss = clam_one_bag(net, h, int(labels[i]), k, subtyping)
            torch.testing.assert_close(logits[i], want_logits[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux["scores"][i, :, : len(b)], A_raw, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(inst[i], want_loss, rtol=1e-5, atol=1e-6)
            branch = int(logits[i].argmax()) if multi_branch else 0
            torch.testing.assert_close(shown[i, : len(b)], torch.softmax(A_raw[branch], 0), rtol=1e-5, atol=1e-6)
    assert (inst > 0).all()
