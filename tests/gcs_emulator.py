"""Runs gcp-storage-emulator (a local GCS JSON-API server) for tests/test_gcs_workdir.py.

    python tests/gcs_emulator.py PORT BUCKET

One gap to real GCS is filled here: real GCS answers a media download with
`x-goog-generation` / `x-goog-metageneration` headers, and tensorstore (Orbax's GCS
driver) takes the object generation of a ranged read from them, then uses it in the
next conditional write of an OCDBT manifest (`ifGenerationMatch`). The emulator omits
them, so tensorstore sees generation 0 and fails with "Malformed StorageGeneration".

A second gap: real GCS refuses an upload with `ifGenerationMatch=0` when the object exists
(412 Precondition Failed: "create only if absent"); the emulator ignores the condition.
The workdir's run lock (esspr_jax/workdir.py) relies on it, so it is honoured here.
"""
import sys
from http import HTTPStatus

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


def _insert_if_absent(request, response, storage, *args, **kwargs):
  if request.query.get("ifGenerationMatch") == ["0"]:
    name = (request.query.get("name") or [None])[0]
    if name is None and isinstance(request.data, dict):
      name = request.data.get("meta", {}).get("name")
    try:
      exists = storage.get_file_obj(request.params["bucket_name"], name) is not None
    except Exception:  # noqa: BLE001  (not found)
      exists = False
    if exists:
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "Precondition Failed",
                               "errors": [{"reason": "conditionNotMet",
                                           "message": "Precondition Failed"}]}})
      return None
  return _original_insert(request, response, storage, *args, **kwargs)


_original_insert = objects.insert
objects.insert = _insert_if_absent

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: int, bucket: str) -> None:
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
