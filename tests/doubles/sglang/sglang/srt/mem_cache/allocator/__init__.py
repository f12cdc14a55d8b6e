"""Paged token-to-KV allocator: pages 1..num_pages in free_pages (page 0 is padding); frees go back
to the head of the list through _release_page_ids."""

import numpy as np


class PagedTokenToKVPoolAllocator:
    def __init__(self, size, page_size):
        self.size, self.page_size, self.num_pages = size, page_size, size // page_size
        self.clear()

    def clear(self):
        self.free_pages = np.arange(1, self.num_pages + 1, dtype=np.int64)
        self.staged_pages = []
        self.num_staged_pages = 0
        self.free_group = None

    def available_size(self):
        return (len(self.free_pages) + self.num_staged_pages) * self.page_size

    def alloc(self, need_size):
        n = need_size // self.page_size
        if n > len(self.free_pages):
            return None
        pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        return (pages[:, None] * self.page_size + np.arange(self.page_size)).reshape(-1)

    def free(self, free_index):
        if len(free_index):
            self._release_page_ids(np.unique(free_index // self.page_size))

    def _release_page_ids(self, *page_ids):
        self.free_pages = np.concatenate([*page_ids, self.free_pages])
