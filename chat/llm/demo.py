"""An offline model: streams a plausible reply word by word, with no network at all.

It is the default backend, so that the chat works with no model installed. The
reply refers to the user's last message and, for some prompts, contains
Markdown (a list, a fenced code block, a table) so that rendering is exercised.

Markers in the user's last message steer it (tests use them):

- ``[demo:echo]`` - reply with exactly the text after the marker (one leading
  space removed);
- ``[demo:fail]`` - stream a few words, then fail with :class:`LLMError`;
- ``[demo:slow]`` - stream at 5 tokens per second.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator

from .base import Backend, LLMError, Usage, clean_messages

DEFAULT_MODEL = "ssechat-demo"
SLOW_TOKENS_PER_SECOND = 5.0
ECHO = "[demo:echo]"
FAIL = "[demo:fail]"
SLOW = "[demo:slow]"

_TOKEN = re.compile(r"\S+\s*|\s+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into word tokens that keep their whitespace (they join to ``text``)."""
    return _TOKEN.findall(text)


def _words(text: str) -> int:
    return len(text.split())


def _quote(text: str, limit: int = 80) -> str:
    text = " ".join(text.replace("`", "'").split())
    for marker in (ECHO, FAIL, SLOW):
        text = text.replace(marker, "")
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


_OPENINGS = [
    'You asked: "{q}". Here is how I would think about it.',
    'Good question: "{q}". Let me take it step by step.',
    'Thanks for your message. About "{q}", here is a short answer.',
    'Let\'s look at "{q}" together.',
    '"{q}" is a nice one to think about.',
]

_SENTENCES = [
    "I am the demo model of ssechat, so this answer is made up offline and streamed to you "
    "word by word over Server-Sent Events.",
    "Every word you see arrives as its own `delta` event, and the page joins them in order.",
    "If you reload the page while I am still typing, the stream resumes from the last event "
    "id your browser saw, so nothing is lost and nothing repeats.",
    "A real model would give a better answer; set `SSECHAT_LLM_BACKEND` to `ollama` or "
    "`openai` to talk to one.",
    "The short version: start small, measure, and only then make it clever.",
    "It usually helps to split the problem into parts that can be checked one at a time.",
    "There are a few trade-offs worth keeping in mind, mostly around latency and simplicity.",
    "Plain HTTP goes a long way: one long response, a few headers, and a browser that knows "
    "how to reconnect.",
    "Try opening this conversation in a second tab: it follows the answer live.",
    "You can press **Stop** at any moment; the text so far is kept.",
]

_CLOSINGS = [
    "Is there anything you would like me to expand on?",
    "I hope this helps. Ask me a follow-up if something is unclear.",
    "Let me know if you want a longer example.",
    "That is the gist of it.",
    "Happy hacking!",
]

_LISTS = [
    [
        "**Keep it simple**: one request, one stream.",
        "**Measure first**: look at the numbers before optimising.",
        "**Handle failure**: the network will drop at the worst time.",
    ],
    [
        "Write down what you want to achieve.",
        "Try the smallest thing that could work.",
        "Check the result, then iterate.",
    ],
    [
        "`EventSource` reconnects by itself.",
        "`Last-Event-ID` tells the server where to resume.",
        "A `retry:` line sets the reconnection delay.",
    ],
]

_CODE = [
    (
        "python",
        "import httpx\n"
        "\n"
        "with httpx.stream('GET', 'http://localhost:8000/demo/stream/') as response:\n"
        "    for line in response.iter_lines():\n"
        "        if line.startswith('data:'):\n"
        "            print(line[5:].strip())\n",
    ),
    (
        "javascript",
        "const source = new EventSource('/demo/stream/');\n"
        "source.addEventListener('message', (event) => {\n"
        "  console.log(JSON.parse(event.data));\n"
        "});\n",
    ),
    (
        "python",
        "def fibonacci(n: int) -> list[int]:\n"
        "    numbers = [0, 1]\n"
        "    while len(numbers) < n:\n"
        "        numbers.append(numbers[-1] + numbers[-2])\n"
        "    return numbers[:n]\n",
    ),
]

_TABLE = (
    "| transport | direction | reconnects by itself |\n"
    "|---|---|---|\n"
    "| Server-Sent Events | server to client | yes |\n"
    "| WebSocket | both ways | no |\n"
    "| Long polling | server to client | sort of |\n"
)

_GREETING = re.compile(r"^\s*(hi|hello|hey|hallo|bonjour|hola|good (morning|evening))\b", re.I)
_WANTS_CODE = re.compile(
    r"\b(code|python|javascript|js|function|script|program|example|snippet|django|sql|api)\b",
    re.I,
)
_WANTS_LIST = re.compile(
    r"\b(list|steps?|how|why|ideas?|tips?|plan|options?|pros|cons|compare|best)\b", re.I
)
_WANTS_TABLE = re.compile(r"\b(table|compare|comparison|versus|vs)\b", re.I)
_WANTS_ALL = re.compile(r"\b(markdown|demo|format(ting)?)\b", re.I)


def compose_reply(prompt: str, rng: random.Random | None = None) -> str:
    """A plausible Markdown reply to ``prompt``."""
    rng = rng or random.Random()
    q = _quote(prompt)
    if not q:
        return "Hello! I am the demo model. Ask me anything and I will stream an answer."
    if _GREETING.match(q) and len(q.split()) <= 4:
        return rng.choice(
            [
                "Hello! I am the ssechat demo model. Ask me something, or ask for a code "
                "example or a list to see Markdown in action.",
                "Hi there! Nice to meet you. What would you like to talk about?",
                "Hey! I stream my answers word by word. Try asking me for a Python example.",
            ]
        )
    everything = bool(_WANTS_ALL.search(q))
    # No double punctuation after a question that ends with its own: "Why?". -> "Why?"
    parts = [re.sub(r'([.!?…])"([.,])', r'\1"', rng.choice(_OPENINGS).format(q=q))]
    parts.append(" ".join(rng.sample(_SENTENCES, rng.randint(1, 3))))
    if everything or _WANTS_LIST.search(q) or rng.random() < 0.25:
        items = rng.choice(_LISTS)
        if rng.random() < 0.5:
            lines = [f"{n}. {item}" for n, item in enumerate(items, 1)]
        else:
            lines = [f"- {item}" for item in items]
        parts.append("A few points:\n\n" + "\n".join(lines))
    if everything or _WANTS_CODE.search(q) or rng.random() < 0.15:
        language, code = rng.choice(_CODE)
        parts.append(f"Here is a small example:\n\n```{language}\n{code}```")
    if everything or _WANTS_TABLE.search(q):
        parts.append("For comparison:\n\n" + _TABLE)
    if everything:
        parts.append("## Summary\n\nThat covers *emphasis*, **bold**, lists, code and a table.")
    parts.append(rng.choice(_CLOSINGS))
    return "\n\n".join(part.strip("\n") for part in parts)


class DemoBackend(Backend):
    """The offline demo model."""

    name = "demo"

    def __init__(self, *, model: str = DEFAULT_MODEL, tokens_per_second: float = 30.0) -> None:
        self.model = model
        self.tokens_per_second = tokens_per_second

    async def stream(self, messages: list[dict]) -> AsyncIterator[str | Usage]:
        messages = clean_messages(messages)
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        rate = self.tokens_per_second
        if SLOW in prompt:
            rate = SLOW_TOKENS_PER_SECOND
        fail = FAIL in prompt
        if ECHO in prompt:
            reply = prompt.split(ECHO, 1)[1]
            if reply.startswith(" "):
                reply = reply[1:]
        else:
            reply = compose_reply(prompt)
        tokens = tokenize(reply)
        if fail:
            tokens = tokens[:5]

        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, token in enumerate(tokens):
            if rate > 0:
                delay = start + index / rate - loop.time()
                await asyncio.sleep(max(delay, 0))
            else:
                await asyncio.sleep(0)
            yield token
        if fail:
            if rate > 0:
                await asyncio.sleep(1 / rate)
            raise LLMError("The demo model failed on purpose.")
        yield Usage(
            prompt_tokens=sum(_words(m["content"]) for m in messages),
            completion_tokens=_words(reply),
        )
