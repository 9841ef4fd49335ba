"""Named weights: shipped entries match their files, the authors' entry loads from a local copy, and
without the Hub the error says where to get the file. Nothing here touches the network."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmp_nb.checkpoint import ENCODER_FORMAT, LEGACY_FORMAT, WEIGHTS_FORMAT, read_checkpoint
from cmp_nb.model import PRESETS, preset_defaults
from cmp_nb.propagator import DEFAULT_MAX_SIDE, load_model, load_propagator
from cmp_nb.weights import (DEFAULT_WEIGHTS, ENV_DIR, REPO, WEIGHTS, WeightsNotAvailable, get_weights,
                            weights_file)

FIXTURE = 'official_resnet50_skiplayer_random_fp16.pth.tar'
AUTHORS = get_weights('authors-semiauto')


@pytest.fixture(scope='module')
def fixture_file(official_fixtures) -> Path:
    torch.set_num_threads(2)
    return official_fixtures / FIXTURE


@pytest.mark.parametrize('name', [n for n, w in WEIGHTS.items() if w.file is not None])
def test_shipped_entry_matches_its_file(name):
    "Every shipped entry says what its file holds: preset, nbins/fmax, training crop; card and figures exist."
    w = WEIGHTS[name]
    model = load_model(name)
    ck = torch.load(REPO / w.file, map_location='cpu', weights_only=True)
    assert (model.preset, model.nbins, model.fmax) == (w.preset, w.nbins, w.fmax)
    assert model.record.train_crop == w.train_crop == ck['config']['data']['crop']
    assert model.record.name == name and model.record.source == str(REPO / w.file)
    assert w.card is None or (REPO / w.card).is_file()
    assert isinstance(w.measured(), dict)
    assert model.record.card == (REPO / w.card if w.card else None)


@pytest.mark.parametrize('name', list(WEIGHTS))
def test_entry_names_a_preset_with_its_bins(name):
    "Every entry's preset is a builder in cmp_nb.model.PRESETS whose default bins are the entry's."
    w = WEIGHTS[name]
    assert w.preset in PRESETS, (w.preset, list(PRESETS))
    defaults = preset_defaults(w.preset)
    assert (defaults['nbins'], defaults['fmax']) == (w.nbins, w.fmax)


@pytest.mark.parametrize('name', [n for n, w in WEIGHTS.items() if w.card is not None])
def test_card_states_the_record(name):
    "The model card says what the registry says: the file, the name, the preset, the training crop, the bins."
    w = WEIGHTS[name]
    card = (REPO / w.card).read_text()
    for fact in (f'`{w.file}`', w.name, f'preset `{w.preset}`', f'{w.train_crop}x{w.train_crop}',
                 f'{w.nbins} bins per axis over +-{w.fmax:g} px'):
        assert fact in card, (fact, w.card)


@pytest.mark.parametrize('name', [n for n, w in WEIGHTS.items() if w.file is not None])
def test_shipped_file_is_legacy_and_keeps_its_entry_by_path(name):
    """The quickstart file predates declared formats (cmp_nb.legacy), the default is a cmp_train weights file;
    loaded by path, each is still its entry."""
    w = WEIGHTS[name]
    assert read_checkpoint(REPO / w.file)[1] == (LEGACY_FORMAT if name == 'quickstart' else WEIGHTS_FORMAT)
    model = load_model(str(REPO / w.file))
    assert model.record.name == name
    assert model.record.card == REPO / w.card


def test_declared_formats(tmp_path):
    "A weights file in the declared format loads; an encoder file or an unknown format is refused by name."
    ck = torch.load(REPO / WEIGHTS['quickstart'].file, map_location='cpu', weights_only=True)
    torch.save({**ck, 'format': WEIGHTS_FORMAT}, tmp_path / 'model.pt')
    model = load_model(tmp_path / 'model.pt')
    ref = load_model('quickstart')
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.record.train_crop == 192
    assert model.record.iteration == ck['iteration']
    torch.save({'format': ENCODER_FORMAT, 'preset': 'small', 'image_encoder': {}}, tmp_path / 'enc.pt')
    with pytest.raises(ValueError, match='is a cmp_nb.encoder/1 file') as e:
        load_model(tmp_path / 'enc.pt')
    assert str(tmp_path / 'enc.pt') in str(e.value)
    torch.save({**ck, 'format': 'cmp_nb.weights/7'}, tmp_path / 'future.pt')
    with pytest.raises(ValueError, match="declares format 'cmp_nb.weights/7'") as e:
        load_model(tmp_path / 'future.pt')
    assert str(tmp_path / 'future.pt') in str(e.value)


def test_default_is_registered():
    assert DEFAULT_WEIGHTS in WEIGHTS and get_weights('default') is WEIGHTS[DEFAULT_WEIGHTS]
    prop = load_propagator(device='cpu')
    assert prop.model.record.name == DEFAULT_WEIGHTS
    assert prop.max_side == (WEIGHTS[DEFAULT_WEIGHTS].train_crop or DEFAULT_MAX_SIDE)


def test_authors_entry_from_a_local_file(fixture_file, tmp_path, monkeypatch):
    "The fixture stands in for ckpt_iter_42000.pth.tar: passed as file=, and found in $CMP_NB_WEIGHTS."
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')            # neither way may reach for the Hub
    prop = load_propagator('authors-semiauto', file=fixture_file, device='cpu')
    assert prop.model.preset == 'resnet50-skip-official' and not prop.model.training
    rec = prop.model.record
    assert (rec.name, rec.train_crop, rec.nbins, rec.fmax, rec.source) == ('authors-semiauto', 384, 99, 50., str(fixture_file))
    assert prop.max_side == 384
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    placed = tmp_path / 'authors-semiauto' / AUTHORS.filename
    placed.parent.mkdir()
    placed.symlink_to(fixture_file)                      # a link, not a copy, of the read-only fixture
    assert weights_file('authors-semiauto') == (placed, AUTHORS)
    hf = f'hf://{AUTHORS.hub_repo}/{AUTHORS.hub_path}'
    assert weights_file(hf) == (placed, AUTHORS)          # the Hub address of a registered file is that entry


def _load_in_fresh_process(tmp_path, **env):
    code = "from cmp_nb.propagator import load_propagator; load_propagator('authors-semiauto')"
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'HF_HOME': str(tmp_path / 'hf'),
           ENV_DIR: str(tmp_path / 'weights'), **env}
    env.pop('HF_HUB_CACHE', None)
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)


def _assert_instructions(err: str):
    assert 'WeightsNotAvailable' in err, err[-2000:]
    for part in ("'authors-semiauto'", AUTHORS.url, 'Google Drive', 'github.com/XiaohangZhan/conditional-motion-propagation',
                 "load_propagator('authors-semiauto', file=", 'authors-semiauto/ckpt_iter_42000.pth.tar'):
        assert part in err, (part, err[-2000:])


def test_offline_error_names_the_way_to_the_file(tmp_path):
    "HF_HUB_OFFLINE=1, empty caches: a clear error, not a download and not a bare Hub exception."
    r = _load_in_fresh_process(tmp_path, HF_HUB_OFFLINE='1')
    assert r.returncode != 0
    _assert_instructions(r.stderr)
    assert 'HF_HUB_OFFLINE=1' in r.stderr
    assert not (tmp_path / 'hf' / 'hub').exists() or not any((tmp_path / 'hf' / 'hub').rglob('*.pth.tar'))


@pytest.mark.slow
def test_unreachable_hub_error(tmp_path):
    "Online mode but no route to the Hub (an endpoint nobody listens on): the same instructions, after the Hub's retries."
    r = _load_in_fresh_process(tmp_path, HF_HUB_OFFLINE='0', HF_ENDPOINT='http://127.0.0.1:9')
    assert r.returncode != 0
    _assert_instructions(r.stderr)
    assert 'the Hub download failed' in r.stderr


def test_unknown_name_and_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='registered: quickstart'):
        load_model('authors-semi')
    with pytest.raises(ValueError, match='wrong file'):
        load_model('authors-semiauto', file=REPO / WEIGHTS['quickstart'].file)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model('authors-semiauto', file=tmp_path / 'missing.pth.tar')


@pytest.mark.parametrize('content', [b'', 'truncated'])
def test_empty_or_truncated_file_names_its_path(tmp_path, content):
    "issue 10 item 7: an empty or cut .pt gives an error naming the path, from load_model and load_propagator."
    bad = tmp_path / 'model.pt'
    bad.write_bytes(content if isinstance(content, bytes) else (REPO / 'data_samples/quickstart.pt').read_bytes()[:100_000])
    for load in (load_model, load_propagator):
        with pytest.raises(ValueError, match='model file .*model.pt is (empty|corrupt)') as e:
            load(bad)
        assert str(bad) in str(e.value)


def test_record_of_a_cmp_train_checkpoint(tmp_path):
    "Any cmp_train checkpoint, not only registered ones, tells the Propagator its training crop."
    from cmp_nb.model import build_model
    m = build_model('small')
    torch.save({'preset': 'small', 'model_kwargs': {}, 'model': m.state_dict(), 'iteration': 3,
                'config': {'data': {'kind': 'synthetic', 'crop': 128, 'short_side': 416}}}, tmp_path / 'm.pt')
    prop = load_propagator(tmp_path / 'm.pt', device='cpu')
    assert (prop.model.record.train_crop, prop.model.record.iteration, prop.model.record.name) == (128, 3, None)
    assert prop.max_side == 128
    torch.save({'preset': 'small', 'model': m.state_dict()}, tmp_path / 'bare.pt')
    assert load_propagator(tmp_path / 'bare.pt', device='cpu').max_side == DEFAULT_MAX_SIDE
