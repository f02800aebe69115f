"""The private descriptor pool of the generated modules (scripts/gen_protos.py). DO NOT EDIT.

tritonclient registers its own `inference.*` messages in protobuf's default pool;
ours live here so both can be imported in one process.
"""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
