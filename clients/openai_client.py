#!/usr/bin/env python3
"""The official `openai` client against fanformer-serve: completions, chat, streaming.

    python clients/openai_client.py --base_url http://127.0.0.1:8000/v1

Point `base_url` at the server's `/v1`; any api_key works unless the server was started
with `--api_key`. Sampling extras that OpenAI does not define (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, ...) go through `extra_body`.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api_key", default=os.environ.get("FANFORMER_API_KEY", "EMPTY"))
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}\n")

    completion = client.completions.create(
        model=model, prompt="Alice was beginning", max_tokens=32, temperature=0.8, top_p=0.95,
        extra_body={"top_k": 50, "repetition_penalty": 1.1})
    print("completion:", repr(completion.choices[0].text))
    print("usage:", completion.usage, "\n")

    chat = client.chat.completions.create(
        model=model, max_completion_tokens=32, temperature=0.7,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Who is the Cheshire Cat?"}])
    print("chat:", repr(chat.choices[0].message.content), chat.choices[0].finish_reason, "\n")

    print("streaming completion: ", end="", flush=True)
    for chunk in client.completions.create(model=model, prompt="The Queen said", max_tokens=32,
                                           stream=True):
        print(chunk.choices[0].text, end="", flush=True)
    print("\n")

    print("streaming chat: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, max_tokens=32, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me about the Mad Hatter."}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n(usage: {chunk.usage.prompt_tokens} prompt + "
                  f"{chunk.usage.completion_tokens} completion tokens)")

    scored = client.completions.create(model=model, prompt="Off with her head!", max_tokens=0,
                                       echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    print("\nprompt token logprobs:", list(zip(lp.tokens, lp.token_logprobs)))


if __name__ == "__main__":
    main()
