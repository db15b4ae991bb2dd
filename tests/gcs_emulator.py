"""Runs gcp-storage-emulator (a local GCS JSON-API server) for tests/test_gcs_workdir.py.

    python tests/gcs_emulator.py PORT BUCKET

One gap to real GCS is filled here: real GCS answers a media download with
`x-goog-generation` / `x-goog-metageneration` headers, and tensorstore (Orbax's GCS
driver) takes the object generation of a ranged read from them, then uses it in the
next conditional write of an OCDBT manifest (`ifGenerationMatch`). The emulator omits
them, so tensorstore sees generation 0 and fails with "Malformed StorageGeneration".
"""
import sys

from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001  (not found: the original handler answers 404)
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _original_download(request, response, storage, *args, **kwargs)


_original_download = objects.download
objects.download = _download_with_generation  # before `server` builds its routing table

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
