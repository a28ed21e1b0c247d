"""Test setup: 8 forced CPU host devices for sharded tests (must be set before jax is imported)."""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402

# The longest test files, longest first (measured in the suite: the miniature's quick run about
# 300 s, the training runs 100-280 s per file). The suite's two workers take whole files
# (`--dist loadfile`) in collection order, so these go first and the short files fill the end;
# pytest-xdist's default of dispatching the files with the most tests first left one worker
# running a long file alone at the end.
LONGEST_FIRST = ("test_miniature.py", "test_train_e2e.py", "test_train_signals.py",
                 "test_object_store.py", "test_fault_tolerance.py", "test_gradients.py",
                 "test_train_continue.py", "test_evals.py", "test_pseudo_label_ray.py",
                 "test_run.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """Runs of the same configs, in this process and in the tools' subprocesses, compile the same
  programs: XLA's persistent cache shares them across the whole session."""
  import jax
  directory = str(tmp_path_factory.mktemp("xla_cache"))
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", directory)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield


# gs:// tests run against a Google Cloud Storage emulator on this machine (`gcs_bucket`). These
# keep every Google client off the network whatever the test does: no metadata-server probe, no
# credentials lookup, and no gRPC bucket-layout call (gcsfs's default, which the emulator does
# not serve). Orbax's etils.epath reaches gs:// through fsspec, as tools/train.py makes it.
_OFFLINE_GOOGLE_CLIENTS = {
    "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "stand-in",
    "GOOGLE_CLOUD_PROJECT": "stand-in", "FSSPEC_GS_TOKEN": "anon",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
}
os.environ.update(_OFFLINE_GOOGLE_CLIENTS)


def _send_generation_headers(emulator):
  """Media downloads answer with the object's generation in `x-goog-generation`, as GCS does and
  TensorStore requires (its OCDBT checkpoints read a manifest they then update conditionally);
  gcp-storage-emulator 2026.7.19 leaves the header out. Patched into its download handler, which
  both media routes (`/download/...` and `?alt=media`) call."""
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  original = objects.download
  if getattr(original, "sends_generation", False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return
    response["x-goog-generation"] = str(found["generation"])
    response["x-goog-metageneration"] = str(found.get("metageneration", "1"))

  download.sends_generation = True
  objects.download = download
  for _, handlers in emulator.HANDLERS:
    if handlers.get(emulator.GET) is original:
      handlers[emulator.GET] = download


def _start_gcs_emulator():
  """gcp-storage-emulator's JSON API (in memory) on a loopback port, one request at a time, on a
  threading server: TensorStore opens many connections at once."""
  import functools
  import threading
  from http import server
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.storage import Storage

  lock = threading.Lock()

  class Handler(emulator.RequestHandler):
    def _serialized(method):  # pylint: disable=no-self-argument
      def handle(self):
        with lock:
          method(self)
      return handle
    do_GET = _serialized(emulator.RequestHandler.do_GET)
    do_POST = _serialized(emulator.RequestHandler.do_POST)
    do_PUT = _serialized(emulator.RequestHandler.do_PUT)
    do_PATCH = _serialized(emulator.RequestHandler.do_PATCH)
    do_DELETE = _serialized(emulator.RequestHandler.do_DELETE)

  class Server(server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
      pass  # a client that closed its connection early (TensorStore does): not the test's error

  _send_generation_headers(emulator)
  storage = Storage(use_memory_fs=True)
  httpd = Server(("127.0.0.1", 0), functools.partial(Handler, storage))
  httpd.lock, httpd.emulator_storage = lock, storage
  threading.Thread(target=httpd.serve_forever, daemon=True, name="gcs-emulator").start()
  return httpd


@pytest.fixture(scope="session")
def gcs_emulator():
  """The emulator (its server: `.lock`, `.emulator_storage`), with gcsfs, google-cloud-storage
  and TensorStore pointed at it, here and in the subprocesses tests start."""
  httpd = _start_gcs_emulator()
  url = f"http://127.0.0.1:{httpd.server_address[1]}"
  os.environ["STORAGE_EMULATOR_HOST"] = os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
    os.environ.pop(name, None)


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
  """A new, empty bucket of the emulator for this test: `gs://NAME`."""
  from gcp_storage_emulator.handlers import buckets
  name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
  with gcs_emulator.lock:
    name = f"{name}-{len(gcs_emulator.emulator_storage.buckets)}"
    buckets.create_bucket(name, gcs_emulator.emulator_storage)
  return f"gs://{name}"
