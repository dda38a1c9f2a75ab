"""Decoder and encoder throughput, ssehub against httpx-sse, side by side in one process.

Run by hand: `.venv/bin/python bench/decoder.py [--events N] [--chunk BYTES] [--repeat R]`.

The stream is N events of about 150 bytes (an `id`, an `event` type and one JSON `data`
line, as a hub or a model relay sends them) cut into fixed-size byte chunks, as a socket
delivers them. Each decoder gets the same chunks:

- ssehub: `Decoder.feed(chunk)` for each chunk, then `close()`.
- httpx-sse (as `EventSource.iter_sse` drives it): httpx's `TextDecoder` turns each chunk
  into text, `SSELineDecoder` splits it into lines inside a generator, `iter_sse` strips
  each line and hands it to `SSEDecoder.decode`.
- httpx-sse without generators: the same three objects called in one flat loop, the
  cheapest way anyone could use httpx-sse's decoders (an upper bound for it).

Each figure is the best of R runs, in CPU time of this process, the runs of the decoders
taken in turn (the least disturbed by other processes); on a shared machine the figures
are noisy, the ratio less so.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator

from httpx._decoders import TextDecoder
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from ssehub.protocol import Decoder, ServerSentEvent, encode, encode_data


def make_stream(events: int, shape: str = "full", size: int = 150) -> bytes:
    """`events` events of about `size` bytes each.

    Shapes: `full` (id, event type, one JSON data line: a hub channel), `data` (one data
    line only: an OpenAI-style completion stream), `lines` (id and three data lines).
    """
    parts = []
    for i in range(events):
        if shape == "full":
            head = f"id: {i}\nevent: update\ndata: "
        elif shape == "data":
            head = "data: "
        else:
            head = f"id: {i}\ndata: line one\ndata: line two\ndata: "
        payload = {"seq": i, "channel": "prices", "text": ""}
        body = json.dumps(payload, separators=(",", ":"))
        pad = max(0, size - len(head) - len(body) - 2)
        payload["text"] = "x" * pad
        parts.append(head + json.dumps(payload, separators=(",", ":")) + "\n\n")
    return "".join(parts).encode()


def chunked(stream: bytes, chunk: int) -> list[bytes]:
    return [stream[i : i + chunk] for i in range(0, len(stream), chunk)]


def run_ssehub(chunks: list[bytes]) -> int:
    decoder = Decoder()
    count = 0
    for chunk in chunks:
        count += len(decoder.feed(chunk))
    count += len(decoder.close())
    return count


def run_httpx_sse(chunks: list[bytes]) -> int:
    # httpx_sse._api: iter_sse() over _iter_sse_lines() over response.iter_text().
    def iter_text() -> Iterator[str]:
        decoder = TextDecoder("utf-8")
        for chunk in chunks:
            yield decoder.decode(chunk)
        yield decoder.flush()

    def iter_sse_lines() -> Iterator[str]:
        decoder = SSELineDecoder()
        for text in iter_text():
            yield from decoder.decode(text)
        yield from decoder.flush()

    def iter_sse() -> Iterator[object]:
        decoder = SSEDecoder()
        for line in iter_sse_lines():
            line = line.rstrip("\n")
            sse = decoder.decode(line)
            if sse is not None:
                yield sse

    return sum(1 for _ in iter_sse())


def run_httpx_sse_flat(chunks: list[bytes]) -> int:
    text_decoder = TextDecoder("utf-8")
    line_decoder = SSELineDecoder()
    decoder = SSEDecoder()
    count = 0
    for chunk in chunks:
        for line in line_decoder.decode(text_decoder.decode(chunk)):
            if decoder.decode(line) is not None:
                count += 1
    for line in line_decoder.flush():
        if decoder.decode(line) is not None:
            count += 1
    return count


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    result = 0
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shape", choices=["full", "data", "lines"], default="full")
    args = parser.parse_args()

    stream = make_stream(args.events, args.shape)
    chunks = chunked(stream, args.chunk)
    print(
        f"decoding {args.events} {args.shape!r} events, "
        f"{len(stream) / args.events:.0f} bytes each, in {len(chunks)} chunks of "
        f"{args.chunk} bytes (best of {args.repeat})"
    )
    runners = {
        "ssehub Decoder": run_ssehub,
        "httpx-sse (iter_sse)": run_httpx_sse,
        "httpx-sse (flat loop)": run_httpx_sse_flat,
    }
    # Round robin, best of R each: a burst of load elsewhere hits all of them alike.
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.repeat):
        for name, fn in runners.items():
            start = time.process_time()
            count = fn(chunks)
            best[name] = min(best[name], time.process_time() - start)
            if count != args.events:
                raise SystemExit(f"{name} decoded {count} events, expected {args.events}")
    results = {name: args.events / seconds for name, seconds in best.items()}
    for name, seconds in best.items():
        print(f"  {name:<24} {results[name]:>12,.0f} events/s  ({seconds * 1000:.1f} ms)")
    ours = results["ssehub Decoder"]
    print(f"  ratio vs httpx-sse (iter_sse):  {ours / results['httpx-sse (iter_sse)']:.2f}x")
    print(f"  ratio vs httpx-sse (flat loop): {ours / results['httpx-sse (flat loop)']:.2f}x")

    events = [
        ServerSentEvent(data=f'{{"seq":{i},"text":"{"x" * 100}"}}', event="update", id=str(i))
        for i in range(args.events)
    ]
    datas = [event.data for event in events]
    print(f"encoding {args.events} events (best of {args.repeat})")
    seconds, _ = best_of(args.repeat, lambda: len([encode(event) for event in events]))
    print(f"  {'encode (id, event, data)':<28} {args.events / seconds:>12,.0f} events/s")
    seconds, _ = best_of(args.repeat, lambda: len([encode_data(data) for data in datas]))
    print(f"  {'encode_data (fast path)':<28} {args.events / seconds:>12,.0f} events/s")


if __name__ == "__main__":
    main()
