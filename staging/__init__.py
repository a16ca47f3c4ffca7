"""kvferry.staging: KV layouts and head-slice plans (`layout`, `plan`), the ring allocator
(`ring`), staging buffers (`buffer`), and gather/scatter between paged KV caches and contiguous
staging regions (`kv_copy`). Import from the modules: the package itself imports nothing, so the
torch-free parts (layouts, plans, the ring) stay importable without torch."""
