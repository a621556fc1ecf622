"""Log-probabilities in OpenAI's shape through the official Python SDK (real Qwen model)."""

import math

import openai
import pytest

from conftest import QWEN


@pytest.fixture
def client(qwen_server):
    return openai.OpenAI(base_url=qwen_server + "/v1", api_key="not-needed", max_retries=0)


def test_logprobs_shape_and_values_whole_and_streamed(client):
    kwargs = dict(model=QWEN, messages=[{"role": "user", "content": "Name three colours."}],
                  max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    r = client.chat.completions.create(**kwargs)
    entries = r.choices[0].logprobs.content
    # Every generated token but the end-of-generation one, which has no text.
    ended_by_eog = r.choices[0].finish_reason == "stop"
    assert len(entries) == r.usage.completion_tokens - int(ended_by_eog)
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and bytes(e.bytes).decode(errors="replace") == e.token
        assert len(e.top_logprobs) == 5
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-5
        probs = [t.logprob for t in e.top_logprobs]
        assert probs == sorted(probs, reverse=True)
        # Greedy: the token taken is the most likely one.
        assert e.top_logprobs[0].token == e.token
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6

    stream = client.chat.completions.create(stream=True, **kwargs)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries]

    # Without logprobs nothing is reported; out-of-range requests are 400s.
    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**kwargs, "top_logprobs": 21})
    assert e.value.body["param"] == "top_logprobs"


def test_legacy_completions_logprobs_whole_and_streamed(client):
    kwargs = dict(model=QWEN, prompt="The colours of the rainbow are", max_tokens=10,
                  temperature=0, logprobs=3)
    r = client.completions.create(**kwargs)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == r.usage.completion_tokens - int(r.choices[0].finish_reason == "stop")
    assert "".join(lp.tokens) == text
    # Offsets point at each token's text in the choice's text.
    for tok, off in zip(lp.tokens, lp.text_offset):
        assert text[off:off + len(tok)] == tok
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
        # Greedy: the token taken is the most likely one.
        assert abs(max(top.values()) - logprob) < 1e-6 and top[tok] == max(top.values())

    streamed_tokens, streamed_offsets = [], []
    for c in client.completions.create(stream=True, **kwargs):
        if c.choices and c.choices[0].logprobs:
            streamed_tokens += c.choices[0].logprobs.tokens
            streamed_offsets += c.choices[0].logprobs.text_offset
    assert (streamed_tokens, streamed_offsets) == (lp.tokens, lp.text_offset)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{**kwargs, "logprobs": 21})
    assert e.value.body["param"] == "logprobs"
