"""Wire protocol (imports as `minirl_async.proto`): messages, codec, weight streaming, socket helpers."""
