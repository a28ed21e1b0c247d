"""`tf.train.Example` parsing without TensorFlow, for the loader's worker processes.

The message classes are built from descriptors written out here (the wire format of
tensorflow/core/example/{example,feature}.proto) in a private descriptor pool, so they parse the
same bytes as TensorFlow's classes with protobuf's C parser, and importing this module costs
milliseconds where `import tensorflow` costs seconds in every worker.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "clipzoo_jax.example"
_LABEL_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_LABEL_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_TYPES = descriptor_pb2.FieldDescriptorProto


def _message(file_proto, name, fields, packed=()):
  message = file_proto.message_type.add(name=name)
  for number, (field_name, label, kind, type_name) in enumerate(fields, start=1):
    field = message.field.add(name=field_name, number=number, label=label, type=kind)
    if type_name:
      field.type_name = f".{_PACKAGE}.{type_name}"
    if field_name in packed:
      field.options.packed = True
  return message


def _build_classes():
  file_proto = descriptor_pb2.FileDescriptorProto(name="clipzoo_jax/example.proto",
                                                  package=_PACKAGE, syntax="proto3")
  _message(file_proto, "BytesList", [("value", _LABEL_REPEATED, _TYPES.TYPE_BYTES, None)])
  _message(file_proto, "FloatList", [("value", _LABEL_REPEATED, _TYPES.TYPE_FLOAT, None)],
           packed=("value",))
  _message(file_proto, "Int64List", [("value", _LABEL_REPEATED, _TYPES.TYPE_INT64, None)],
           packed=("value",))
  feature = _message(file_proto, "Feature", [
      ("bytes_list", _LABEL_OPTIONAL, _TYPES.TYPE_MESSAGE, "BytesList"),
      ("float_list", _LABEL_OPTIONAL, _TYPES.TYPE_MESSAGE, "FloatList"),
      ("int64_list", _LABEL_OPTIONAL, _TYPES.TYPE_MESSAGE, "Int64List")])
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = _message(file_proto, "Features", [
      ("feature", _LABEL_REPEATED, _TYPES.TYPE_MESSAGE, "Features.FeatureEntry")])
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, label=_LABEL_OPTIONAL, type=_TYPES.TYPE_STRING)
  entry.field.add(name="value", number=2, label=_LABEL_OPTIONAL, type=_TYPES.TYPE_MESSAGE,
                  type_name=f".{_PACKAGE}.Feature")
  _message(file_proto, "Example", [("features", _LABEL_OPTIONAL, _TYPES.TYPE_MESSAGE, "Features")])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file_proto)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Example"))


Example = _build_classes()


def parse(serialized: bytes) -> dict:
  """Feature name -> list of values (bytes, float or int) of one serialized Example.

  Raises google.protobuf.message.DecodeError on bytes that are not an Example.
  """
  example = Example.FromString(serialized)
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = list(getattr(feature, kind).value) if kind else []
  return out
