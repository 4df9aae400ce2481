"""ElasticsearchRetriever and index_corpus over real HTTP.

By default the server is osmem-server (an in-memory OpenSearch emulator from PyPI) started here on a free
port; with IGPO_ES_URL set (and optionally IGPO_ES_API_KEY) the same tests run against that real
Elasticsearch instead, and the osmem variant is skipped. Tests that stop the server run on osmem only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from elastic_transport import ApiResponseMeta, ConnectionTimeout, HttpHeaders, NodeConfig, Urllib3HttpNode
from elasticsearch import ApiError, Elasticsearch
from osmem_server import resolve_binary

from igpo.retriever import BM25Retriever, Retriever
from igpo.retriever.corpus import CorpusFormatError, iter_corpus
from igpo.retriever.elasticsearch import (
    FAILED_DOC,
    ElasticsearchRetriever,
    IndexSettings,
    SearchError,
    _ItemError,
    call_with_retries,
    index_corpus,
    is_retryable,
    main,
)
from igpo.types import Doc

pytestmark = pytest.mark.es

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny_corpus.jsonl"
FAST = {"request_timeout": 5.0, "max_retries": 2, "retry_backoff": 0.01}


class OsmemCompatNode(Urllib3HttpNode):
    """Test-only transport node: lets the official ES 9 client talk to osmem.

    The client sends `application/vnd.elasticsearch+json; compatible-with=9` (and the x-ndjson variant) as
    accept/content-type on every request, also over per-request `headers=`, and osmem answers HTTP 406 to
    that media type. Rewriting the two headers to plain JSON at the node, the last step before the wire, is
    the one public hook that works. A real Elasticsearch understands the vendor type, so this lives in the
    tests and reaches the retriever only through its `client_options`.
    """

    def perform_request(self, method: str, target: str, body: bytes | None = None,
                        headers: HttpHeaders | None = None, **kwargs: Any) -> Any:
        h = HttpHeaders(headers or {})
        for key in ("accept", "content-type"):
            value = h.get(key)
            if value and "compatible-with" in value:
                h[key] = "application/x-ndjson" if "x-ndjson" in value else "application/json"
        return super().perform_request(method, target, body=body, headers=h, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Osmem:
    """osmem-server as a subprocess on a fixed port (so it can be stopped and restarted mid-test).

    The wheel bundles a Go binary (`osmem_server.resolve_binary()`); options: --addr HOST:PORT, --no-ja
    (no Japanese analysis), --parent-pid (exit with us), and it exits when its stdin closes.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        args = [resolve_binary(), "--addr", f"127.0.0.1:{self.port}", "--no-ja",
                "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"osmem-server exited with {self.proc.returncode} on port {self.port}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"osmem-server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.stdin.close()  # osmem exits when stdin closes
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Server:
    kind: str
    url: str
    client_options: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    osmem: Osmem | None = None

    def retriever(self, index: str, **kwargs: Any) -> ElasticsearchRetriever:
        opts = {**FAST, **kwargs}
        return ElasticsearchRetriever(self.url, index, api_key=self.api_key,
                                      client_options=self.client_options, **opts)


@pytest.fixture(scope="module", params=["osmem", "elasticsearch"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    real_url = os.environ.get("IGPO_ES_URL")
    if request.param == "elasticsearch":
        if not real_url:
            pytest.skip("IGPO_ES_URL not set: no real Elasticsearch to test against")
        yield Server("elasticsearch", real_url, api_key=os.environ.get("IGPO_ES_API_KEY"))
        return
    if real_url:
        pytest.skip("IGPO_ES_URL set: testing the real Elasticsearch instead of osmem")
    osmem = Osmem()
    osmem.start()
    try:
        yield Server("osmem", osmem.url, {"node_class": OsmemCompatNode}, osmem=osmem)
    finally:
        osmem.stop()


@pytest.fixture
def index(server: Server) -> Iterator[str]:
    """A fresh index name per test, deleted afterwards (matters on a real cluster)."""
    name = f"igpo-test-{uuid.uuid4().hex[:10]}"
    yield name
    if server.osmem is None or server.osmem.proc is not None:
        r = server.retriever(name)
        r.client.options(ignore_status=404).indices.delete(index=name)
        r.close()


@pytest.fixture
def es(server: Server, index: str) -> Iterator[ElasticsearchRetriever]:
    r = server.retriever(index)
    yield r
    r.close()


def count_sent_docs(client: Elasticsearch) -> list[int]:
    """Record how many documents each bulk request carries (one action line + one source line each)."""
    sent: list[int] = []
    transport = client.transport  # shared by the client copies that helpers make with client.options()
    perform = transport.perform_request

    def counting(method: str, target: str, **kwargs: Any) -> Any:
        if target.split("?")[0].endswith("/_bulk"):
            sent.append(len(kwargs["body"]) // 2)
        return perform(method, target, **kwargs)

    transport.perform_request = counting  # type: ignore[method-assign]
    return sent


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


FIXTURE_LINES = FIXTURE.read_text().splitlines()


def test_create_index_and_refuse_other_settings(server: Server, es: ElasticsearchRetriever,
                                                index: str) -> None:
    with pytest.raises(SearchError, match=f"index '{index}' does not exist"):
        es.setup()
    assert es.ensure_index() is True
    assert es.ensure_index() is False
    es.setup()  # exists, same settings
    mapping = es.client.indices.get_mapping(index=index)[index]["mappings"]["properties"]
    assert mapping["id"]["type"] == "keyword"
    assert mapping["title"]["type"] == mapping["text"]["type"] == "text"
    for other, what in [({"k1": 2.0}, "similarity.k1"),  # a mapping, as a config would pass it
                        (IndexSettings(analyzer="standard"), "analyzer"),
                        (IndexSettings(number_of_shards=2), "number_of_shards")]:
        r = server.retriever(index, settings=other)
        with pytest.raises(ValueError, match=f"exists with other settings.*{what}"):
            r.ensure_index()
        with pytest.raises(ValueError, match=what):
            r.setup()
        r.close()


def test_bulk_ingest_counts_and_resume(server: Server, es: ElasticsearchRetriever, index: str,
                                       tmp_path: Path) -> None:
    sent = count_sent_docs(es.client)
    part = write_lines(tmp_path / "part.jsonl", FIXTURE_LINES[:20])
    first = index_corpus(es, part, chunk_size=8, progress=False)
    assert (first.indexed, first.skipped_existing, first.bad_lines) == (20, 0, 0)
    assert sent == [8, 8, 4] and es.client.count(index=index)["count"] == 20
    # resume on the full corpus: the 20 already there are looked up and skipped, only 10 are sent
    sent.clear()
    second = index_corpus(es, FIXTURE, chunk_size=8, progress=False)
    assert (second.indexed, second.skipped_existing, second.bad_lines) == (10, 20, 0)
    assert sent == [4, 6]  # chunks 0-7, 8-15 all found; 16-23 sends 20-23; 24-29 (lookups stopped)
    sent.clear()
    third = index_corpus(es, FIXTURE, chunk_size=8, progress=False)
    assert (third.indexed, third.skipped_existing) == (0, 30) and sent == []
    assert es.client.count(index=index)["count"] == 30
    got = es.client.get(index=index, id="0")["_source"]
    assert got["title"] == "Ada Lovelace"
    assert got["text"].startswith("Ada Lovelace was an English mathematician")


def test_resume_with_gaps_uses_create_conflicts(server: Server, index: str, tmp_path: Path) -> None:
    """Docs 0-9 and 20-29 exist: chunk 0-9 is found by mget, chunk 10-19 finds none (lookups stop),
    chunk 20-29 is sent and the 409 conflicts of op_type create count as existing. Through a raw client."""
    r = server.retriever(index)
    client = r.client
    gaps = write_lines(tmp_path / "gaps.jsonl", FIXTURE_LINES[:10] + FIXTURE_LINES[20:])
    assert index_corpus(client, gaps, index=index, chunk_size=10, progress=False).indexed == 20
    sent = count_sent_docs(client)
    report = index_corpus(client, FIXTURE, index=index, chunk_size=10, progress=False)
    assert (report.indexed, report.skipped_existing) == (10, 20)
    assert sent == [10, 10]  # 10-19, then 20-29 unchecked: 10 conflicts
    assert client.count(index=index)["count"] == 30
    with pytest.raises(ValueError, match="pass index=NAME"):
        index_corpus(client, FIXTURE)
    r.close()


def test_bad_lines_skip_and_raise(server: Server, es: ElasticsearchRetriever, tmp_path: Path) -> None:
    lines = FIXTURE_LINES[:2] + ["{not json"] + FIXTURE_LINES[2:4] + ['{"id": 9}']
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(CorpusFormatError, match=r"bad.jsonl: line 3: invalid JSON"):
        index_corpus(es, path, on_error="raise", progress=False)
    # the raise came while the first chunk was being read, so nothing was sent by that run
    report = index_corpus(es, path, on_error="skip", progress=False)
    assert (report.indexed, report.skipped_existing, report.bad_lines) == (4, 0, 2)
    assert report.errors[0].startswith(f"{path}: line 3: invalid JSON")
    assert report.errors[1].startswith(f"{path}: line 6: missing 'contents'")
    assert "bad line:" in str(report) and "line 6" in str(report)


def test_msearch_shape_ranking_and_same_shape_as_bm25(server: Server, es: ElasticsearchRetriever,
                                                     tmp_path: Path) -> None:
    index_corpus(es, FIXTURE, progress=False)
    es.setup()
    assert isinstance(es, Retriever)
    calls: list[int] = []
    msearch = es.client.msearch

    def counting_msearch(**kwargs: Any) -> Any:
        calls.append(len(kwargs["searches"]) // 2)
        return msearch(**kwargs)

    es.client.msearch = counting_msearch  # type: ignore[method-assign]
    docs = list(iter_corpus(FIXTURE))
    queries = [d.title for d in docs] + ["", "xyzzy plugh", "capital of Nepal"]
    got = es.search_batch(queries, k=3)
    assert calls == [len(queries) - 1]  # one msearch for the batch; the empty query is not sent
    bm25 = BM25Retriever(shutil.copy(FIXTURE, tmp_path / "corpus.jsonl"))
    bm25.setup()
    want = bm25.search_batch(queries, k=3)
    assert len(got) == len(want) == len(queries)
    for es_docs, bm_docs in zip(got, want, strict=True):
        assert all(isinstance(d, Doc) for d in es_docs) and len(es_docs) <= 3
        assert [d.score for d in es_docs] == sorted((d.score for d in es_docs), reverse=True)
        assert (len(es_docs) == 0) == (len(bm_docs) == 0)
    # exact title: its own doc first, in both retrievers, with the corpus' title and text
    assert [r[0].id for r in got[: len(docs)]] == [d.id for d in docs] == [r[0].id for r in want[: len(docs)]]
    assert got[0][0] == Doc(id="0", title=docs[0].title, text=docs[0].text, score=got[0][0].score)
    assert got[-3] == [] and got[-2] == []
    assert {d.title for d in got[-1][:2]} == {"Nepal", "Kathmandu"}
    assert es.search_batch(["Paris"], k=0) == [[]] and es.search_batch([], k=3) == []


def test_search_on_missing_index_is_not_retried(server: Server, index: str) -> None:
    r = server.retriever(index, on_failure="raise")
    with pytest.raises(SearchError, match="not retryable"):
        r.search_batch(["anything"], k=2)
    assert r.retries == 0
    r.close()


class SilentServer:
    """Accepts TCP connections and never answers: a server that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(timeout=2)


def test_request_timeout_is_bounded_and_retried() -> None:
    silent = SilentServer()
    try:
        r = ElasticsearchRetriever(silent.url, "idx", request_timeout=0.3, max_retries=1, retry_backoff=0.05)
        start = time.monotonic()
        with pytest.raises(SearchError, match="after 2 attempt") as info:
            r.search_batch(["who hangs?"], k=3)
        elapsed = time.monotonic() - start
        assert isinstance(info.value.__cause__, ConnectionTimeout)
        assert 0.6 <= elapsed < 2.0  # two 0.3 s timeouts and a 0.05 s backoff, not the 10 s default
        placeholder = ElasticsearchRetriever(silent.url, "idx", request_timeout=0.2, max_retries=0,
                                             on_failure="placeholder")
        assert placeholder.search_batch(["a", "", "b"], k=3) == [[FAILED_DOC], [], [FAILED_DOC]]
        assert placeholder.failures == 2
    finally:
        silent.close()


def test_server_stopped_mid_test_retries_then_fails_and_recovers(server: Server, index: str) -> None:
    if server.osmem is None:
        pytest.skip("cannot stop a real Elasticsearch")
    raising = server.retriever(index, max_retries=2, retry_backoff=0.01)
    lenient = server.retriever(index, max_retries=1, retry_backoff=0.01, on_failure="placeholder")
    index_corpus(raising, FIXTURE, progress=False)
    assert raising.search_batch(["Marie Curie"], k=1)[0][0].id == "7"
    server.osmem.stop()
    try:
        start = time.monotonic()
        with pytest.raises(SearchError, match="msearch request on index .* failed after 3 attempt"):
            raising.search_batch(["Marie Curie", "Radium"], k=2)
        assert raising.retries == 2 and time.monotonic() - start < 3.0
        assert lenient.search_batch(["Marie Curie", "Radium"], k=2) == [[FAILED_DOC], [FAILED_DOC]]
        assert (lenient.failures, lenient.retries) == (2, 1)
    finally:
        server.osmem.start()
    # the same retriever objects work again once the server is back (osmem starts empty: re-ingest)
    assert index_corpus(raising, FIXTURE, progress=False).indexed == 30
    assert raising.search_batch(["Radium"], k=1)[0][0].title == "Radium"
    assert lenient.search_batch(["Radium"], k=1)[0][0].title == "Radium" and lenient.failures == 2
    raising.close()
    lenient.close()


def test_cli_index(server: Server, index: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["index", f"corpus={FIXTURE}", f"index={index}", f"hosts={server.url}", "chunk_size=7"]
    if server.api_key:
        os.environ.setdefault("IGPO_TEST_ES_KEY", server.api_key)
        args.append("api_key_env=IGPO_TEST_ES_KEY")
    assert main(args, client_options=server.client_options) == 0
    assert "indexed=30 skipped_existing=0 bad_lines=0" in capsys.readouterr().out
    assert main(args, client_options=server.client_options) == 0
    assert "indexed=0 skipped_existing=30" in capsys.readouterr().out
    assert main(["index", "corpus=x"]) == 2 and main(["search"]) == 2 and main(["index", "oops"]) == 2
    assert main(["index", f"corpus={FIXTURE}", f"index={index}", "colour=red"]) == 2
    assert "unknown argument(s) ['colour']" in capsys.readouterr().err
    bad = write_lines(tmp_path / "bad.jsonl", ["{oops"])
    assert main(["index", f"corpus={bad}", f"index={index}", f"hosts={server.url}", "on_error=raise"],
                client_options=server.client_options) == 1
    assert f"error: {bad}: line 1: invalid JSON" in capsys.readouterr().err


# -- the retry policy itself, with a fake clock (no server) ----------------------------------------

def api_error(status: int) -> ApiError:
    meta = ApiResponseMeta(status=status, http_version="1.1", headers=HttpHeaders(), duration=0.0,
                           node=NodeConfig("http", "localhost", 9200))
    return ApiError(f"HTTP {status}", meta=meta, body={})


def test_retry_policy_backoff_and_classification() -> None:
    sleeps: list[float] = []
    outcomes: list[Any] = [api_error(503), api_error(429), _ItemError(502, "bad gateway"), "ok"]

    def flaky() -> str:
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    assert call_with_retries(flaky, max_retries=3, backoff=0.5, what="t", sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]  # backoff * 2**attempt

    sleeps.clear()
    with pytest.raises(SearchError, match="t failed after 3 attempt") as info:
        call_with_retries(lambda: (_ for _ in ()).throw(api_error(500)), max_retries=2, backoff=0.1, what="t",
                          sleep=sleeps.append)
    assert sleeps == [0.1, 0.2] and isinstance(info.value.__cause__, ApiError)

    assert not is_retryable(api_error(400)) and not is_retryable(api_error(404)) and not is_retryable(
        _ItemError(404, "x")) and not is_retryable(ValueError("x"))
    assert all(is_retryable(api_error(s)) for s in (429, 500, 502, 503, 504))
    with pytest.raises(SearchError, match="not retryable"):
        call_with_retries(lambda: (_ for _ in ()).throw(api_error(400)), max_retries=5, backoff=1, what="t",
                          sleep=sleeps.append)
    assert sleeps == [0.1, 0.2]
