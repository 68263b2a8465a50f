#!/usr/bin/env python3
"""An interactive terminal chat that streams the reply token by token.

    python clients/chat.py [--base_url http://127.0.0.1:8000/v1] [--system "You are terse."]

Type a message and press Enter; `/reset` forgets the conversation, `/quit` (or Ctrl+D)
leaves. Ctrl+C while a reply streams stops that reply (the server aborts the request).
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import APIError, OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base_url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api_key", default=os.environ.get("FANFORMER_API_KEY", "EMPTY"))
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max_tokens", type=int, default=256)
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except APIError as e:
        print(f"chat: cannot reach {args.base_url} ({e})", file=sys.stderr)
        return 1
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"chatting with {model}; /reset, /quit")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply, stream = "", None
        print("bot> ", end="", flush=True)
        try:
            stream = client.chat.completions.create(
                model=model, messages=history, stream=True, temperature=args.temperature,
                max_tokens=args.max_tokens)
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    reply += piece
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # closing the connection aborts the request on the server
            print(" [stopped]", end="")
        except APIError as e:
            print(f"[error: {e}]", end="")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
