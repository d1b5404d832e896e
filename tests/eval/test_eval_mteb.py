"""The MTEB/MIEB encoder wrapper: mteb's EncoderProtocol on dict batches of texts, images or both."""
import numpy as np
import pytest

from support import eval_data as fx
from e5v import E5V, prompts
from e5v.errors import BatchInputError, ConfigError
from e5v.eval.mteb import E5VMTEB


@pytest.fixture(scope="module")
def wrapper(tiny_dirs):
    return E5VMTEB(E5V.from_pretrained(str(tiny_dirs["e5v-like"]), device="cpu", dtype="float32"), chunk_size=3)


def test_batches_of_each_modality_in_order(wrapper):
    m = wrapper.model
    texts = ["a dog runs", "a red ball", "the sea", "a house", "a tree"]
    imgs = [fx.image(i) for i in range(4)]
    batches = [{"text": texts[:2]}, {"text": texts[2:]}]  # what a DataLoader of text batches yields
    got = wrapper.encode(batches, task_metadata=None, hf_split="test", hf_subset="default")
    assert got.shape == (5, m.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, m.encode_text(texts), atol=1e-5)
    got = wrapper.encode([{"image": imgs[:3]}, {"image": imgs[3:]}], task_metadata=None, hf_split="test",
                         hf_subset="default")
    np.testing.assert_allclose(got, m.encode_image(imgs), atol=1e-5)
    # image + text in one batch: composed queries with the official CIRR prompt; an empty text means image only
    batch = {"image": imgs[:3], "text": ["is red", "", "has a hat"]}
    got = wrapper.encode([batch], task_metadata=None, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(got[[0, 2]], m.encode_composed([(imgs[0], "is red"), (imgs[2], "has a hat")]), atol=1e-5)
    np.testing.assert_allclose(got[1], m.encode_image([imgs[1]])[0], atol=1e-5)
    assert wrapper.prompts["composed"] == prompts.CIRR_QUERY


def test_similarity_is_cosine(wrapper):
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[0.0, 2.0]])
    assert np.asarray(wrapper.similarity(a, b)).ravel().tolist() == pytest.approx([0.8, 0.0])
    pairwise = wrapper.similarity_pairwise(a, np.array([[3.0, 4.0], [0.0, 1.0]]))
    assert np.asarray(pairwise).tolist() == pytest.approx([1, 0])
    assert float(wrapper.similarity(a[0], b[0])) == pytest.approx(0.8)  # 1-D inputs give a 1x1 result


def test_bad_item_is_named(wrapper):
    with pytest.raises(BatchInputError, match="mteb input 1"):
        wrapper.encode([{"text": ["fine", "   "]}], task_metadata=None, hf_split="test", hf_subset="default")


def test_loads_a_checkpoint_with_engine_options(wrapper, tiny_dirs):
    """A model name is loaded through the engine configuration: its options reach the engine (the same vectors
    as the loaded engine's), and an option that is not one is refused before anything loads."""
    own = E5VMTEB(str(tiny_dirs["e5v-like"]), device="cpu", dtype="float32", max_batch_size=2, alpha="official")
    assert own.model.max_batch_size == 2 and own.model.image_options == {"alpha": "official"}
    texts = ["a dog runs", "a red ball", "the sea"]
    got = own.encode([{"text": texts}], task_metadata=None, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(got, wrapper.model.encode_text(texts), atol=1e-5)
    with pytest.raises(ConfigError, match="unknown engine option.*max_batch"):
        E5VMTEB(str(tiny_dirs["e5v-like"]), device="cpu", max_batch=2)


@pytest.mark.slow
def test_real_mteb_mock_tasks(wrapper):
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask
    from mteb.mocks.mock_tasks.sts import MockSTSTask
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(wrapper, EncoderProtocol)
    assert wrapper.mteb_model_meta.modalities == ["image", "text"]
    res = mteb.evaluate(wrapper, [MockSTSTask(), MockAny2AnyRetrievalT2ITask()], cache=None, show_progress_bar=False,
                        raise_error=True)
    names = {r.task_name for r in res.task_results}
    assert names == {"MockSTSTask", "MockAny2AnyRetrievalT2I"}
    for r in res.task_results:
        assert np.isfinite(r.get_score())
