"""The released CMP checkpoints load into cmp_nb and compute what the authors' code computes."""
import json

import numpy as np
import pytest
import torch

from cmp_nb.checkpoint import AUTHORS_FORMAT, read_checkpoint
from cmp_nb.losses import logits_to_flow
from cmp_nb.model import PRESETS, build_model, infer_preset, load_official_checkpoint, preset_defaults

RELEASED = {'resnet50_skiplayer_semiauto': 'resnet50-skip-official',
            'resnet50_plain_voc': 'resnet50-plain',
            'alexnet_plain_voc': 'alexnet-plain'}


LOGITS_STRIDE = {'resnet50-skip-official': 2, 'resnet50-plain': 8, 'alexnet-plain': 32, 'small': 8, 'small-skip': 2,
                 'small-refine': 4, 'small-attend': 4}


@pytest.fixture(scope='module')
def official(official_fixtures):
    torch.set_num_threads(2)
    return load_official_checkpoint(official_fixtures / 'official_resnet50_skiplayer_random_fp16.pth.tar')


@pytest.fixture(scope='module')
def reference(official_fixtures):
    io = np.load(official_fixtures / 'official_resnet50_skiplayer_reference_io.npz')
    return {k: io[k] for k in io.files}


def test_fixture_is_the_authors_format(official_fixtures):
    "The released checkpoints declare no format; theirs is recognised by its documented structure."
    ck, fmt = read_checkpoint(official_fixtures / 'official_resnet50_skiplayer_random_fp16.pth.tar')
    assert fmt == AUTHORS_FORMAT
    assert set(ck) == {'step', 'state_dict'}
    assert all(k.startswith('module.') for k in ck['state_dict'])


def test_checkpoint_preset_inferred(official):
    assert official.preset == 'resnet50-skip-official'
    assert not official.training
    assert all(p.dtype == torch.float32 for p in official.parameters())


def test_reference_logits_and_flow(official, reference):
    image, sparse = torch.from_numpy(reference['image']), torch.from_numpy(reference['sparse'])
    with torch.no_grad():
        logits = official(image, sparse)
        split = official.propagate(official.encode(image), sparse)
        textbook = official.forward_unsplit(image, sparse)
    ref = torch.from_numpy(reference['logits'])
    assert logits.shape == ref.shape == (1, 198, 128, 128)
    assert (logits - ref).abs().max().item() < 1e-3
    assert (split - logits).abs().max().item() < 1e-4
    assert (textbook - logits).abs().max().item() < 1e-4
    flow = logits_to_flow(logits, int(reference['nbins']), float(reference['fmax']))
    assert (flow - torch.from_numpy(reference['flow'])).abs().max().item() < 1e-3


@pytest.mark.parametrize('config', list(RELEASED))
def test_manifest_keys_and_shapes(official_fixtures, config):
    manifest = json.loads((official_fixtures / 'official_state_dict_manifest.json').read_text())[config]
    model = build_model(RELEASED[config])
    want = {k.removeprefix('module.'): (tuple(s), d) for k, (s, d) in manifest['state_dict'].items()}
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    assert got == want, sorted(set(got) ^ set(want))[:20]
    assert sum(p.numel() for p in model.parameters()) == manifest['n_params']
    assert infer_preset(model.state_dict()) == (RELEASED[config], {})


@pytest.mark.parametrize('name', list(PRESETS))
def test_split_matches_textbook(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
    size = 128
    image, sparse = torch.randn(2, 3, size, size), torch.zeros(3, 4, size, size)
    sparse[:, :, 40, 50] = torch.tensor([[4., -2, 1, 1], [-3, 5, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        one = model.encode(image[:1])
        many = model.propagate(one, sparse)                       # features batch 1 vs sparse batch 3
        ref = model.forward_unsplit(image[:1].expand(3, -1, -1, -1), sparse)
        pair = model(image, sparse[:2])
        pair_ref = model.forward_unsplit(image, sparse[:2])
    s = model.logits_stride
    assert s == model.flow_decoder.out_stride == LOGITS_STRIDE[name]
    assert many.shape == (3, 2 * model.nbins, size // s, size // s)
    assert (many - ref).abs().max() < 1e-4
    assert (pair - pair_ref).abs().max() < 1e-4


def test_loader_refuses_mismatch(tmp_path):
    sd = {'module.' + k: v.half() for k, v in build_model('small').state_dict().items()
          if not k.endswith('num_batches_tracked')}
    del sd['module.flow_decoder.head.bias']
    sd['module.something.else'] = torch.zeros(2)
    path = tmp_path / 'broken.pth.tar'
    torch.save({'step': 1, 'state_dict': sd}, path)
    with pytest.raises(ValueError) as e:
        load_official_checkpoint(path)
    msg = str(e.value)
    assert 'broken.pth.tar' in msg and 'flow_decoder.head.bias' in msg and 'something.else' in msg
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / 'absent.pth.tar')


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as e:
        build_model('resnet152')
    assert all(name in str(e.value) for name in PRESETS)


# Every preset's state dict as the string-named presets built it before each preset had its own builder:
# (number of keys, number of parameters, sha256 of the lines 'key shape dtype' in state-dict order).
PRESET_STATE_DICTS = {
    'resnet50-skip-official': (455, 28516422, '0fd641f16dde417ec59bb22d1c8e5577c612a2a620dfa32f972c2e83794f9bd3'),
    'resnet50-plain': (378, 25497510, '9b9ddd73bd0f1c8bb12588dd40cbecb4cb03464d53ae8d4cad83228459927d95'),
    'alexnet-plain': (109, 32502694, 'a497da3aa40eaa00701c2b75f57be7d6df364a4a55b587943f458c5860ddf9de'),
    'small': (120, 2181030, 'ffef3179252d02093e6bdbfea8d59b1a40cdd32b666e7740539e8f661e4385cf'),
    'small-skip': (197, 4978758, '8604af5fa3895c2e0ab763df3a954b44ce03f809eb93dd7dba10dfdc5bd45bfe'),
    'small-refine': (157, 2324220, '19a1733f76468c339d3707e7d6dc7c5f8f2ed8ce8a2014ac72f795420dd3073a'),
    'small-attend': (164, 2327424, '188d70ecaad20d1231b69ee997b5f63ed55cfd20066eb7a5bdcd037b4854a90d'),
}


@pytest.mark.parametrize('name', list(PRESETS))
def test_preset_state_dict_unchanged(name):
    "The builder of each preset gives the very keys, shapes and dtypes recorded for it, in the same order."
    import hashlib
    model = PRESETS[name]()
    sd = model.state_dict()
    lines = '\n'.join(f'{k} {tuple(v.shape)} {v.dtype}' for k, v in sd.items())
    got = (len(sd), sum(p.numel() for p in model.parameters()), hashlib.sha256(lines.encode()).hexdigest())
    assert got == PRESET_STATE_DICTS[name], (name, got, lines[:2000])
    assert model.preset == name


def test_build_model_is_the_builder_by_name():
    "build_model(name, **options) = PRESETS[name](**options): the same parameters from the same seed."
    torch.manual_seed(0)
    a = PRESETS['small-skip'](nbins=49, combo=(1, 2))
    torch.manual_seed(0)
    b = build_model('small-skip', nbins=49, combo=(1, 2))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert (b.preset, b.nbins, b.flow_decoder.combo, b.logits_stride) == ('small-skip', 49, (1, 2), 2)
    assert preset_defaults('resnet50-skip-official')['n_convs'] == 3
    assert preset_defaults('small')['n_convs'] == 2
    with pytest.raises(ValueError) as e:
        build_model('small', decoder='skip')
    assert "unknown option(s) ['decoder'] for preset 'small'" in str(e.value)
    assert all(o in str(e.value) for o in preset_defaults('small')), str(e.value)
