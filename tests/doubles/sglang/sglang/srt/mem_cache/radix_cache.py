"""Radix prefix cache over page-aligned token keys: a node's value holds the token indices of its
KV; lock_ref > 0 protects a node (and its ancestors), lock_ref == 0 leaves it evictable; insert adds
the part of a key the tree lacks as a new leaf; evict frees unlocked leaves, oldest first."""

import itertools

import numpy as np

_clock = itertools.count()


class TreeNode:
    def __init__(self, key=(), value=None, parent=None):
        self.key, self.value, self.parent = tuple(key), value, parent
        self.children, self.lock_ref, self.last = {}, 0, next(_clock)


class InsertResult:
    def __init__(self, prefix_len, last_device_node):
        self.prefix_len, self.last_device_node = prefix_len, last_device_node


class RadixCache:
    def __init__(self, allocator, page_size):
        self.token_to_kv_pool_allocator, self.page_size = allocator, page_size
        self.disable = False
        self.reset()

    def reset(self):
        self.root_node = TreeNode(value=np.zeros(0, np.int64))
        self.root_node.lock_ref = 1
        self.evictable_size_ = self.protected_size_ = 0

    def match_prefix(self, key):
        """The longest cached page-aligned prefix; a match ending inside a node splits it there."""
        ps = self.page_size
        key = list(key[: len(key) // ps * ps])
        node, n = self.root_node, 0
        while n < len(key):
            child = node.children.get(tuple(key[n : n + ps]))
            if child is None:
                break
            m = 0
            while m < len(child.key) and n + m < len(key) and child.key[m] == key[n + m]:
                m += 1
            m = m // ps * ps
            if m == 0:
                break
            if m < len(child.key):
                child = self._split(child, m)
            node, n = child, n + m
            node.last = next(_clock)
            if m < len(node.key):
                break
        return n, node

    def _split(self, child, m):
        top = TreeNode(child.key[:m], child.value[:m], child.parent)
        top.lock_ref = child.lock_ref
        child.parent.children[child.key[: self.page_size]] = top
        child.key, child.value, child.parent = child.key[m:], child.value[m:], top
        top.children[child.key[: self.page_size]] = child
        return top

    def insert(self, key, value):
        key = key[: len(key) // self.page_size * self.page_size]
        n, node = self.match_prefix(key)
        if n < len(key):
            new = TreeNode(key[n:], np.asarray(value[n : len(key)]), node)
            node.children[tuple(key[n : n + self.page_size])] = new
            self.evictable_size_ += len(new.key)
            node = new
        return InsertResult(n, node)

    def inc_lock_ref(self, node):
        while node is not self.root_node:
            if node.lock_ref == 0:
                self.evictable_size_ -= len(node.key)
                self.protected_size_ += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node):
        while node is not self.root_node:
            if node.lock_ref == 1:
                self.evictable_size_ += len(node.key)
                self.protected_size_ -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens):
        done = 0
        while done < num_tokens:
            leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
            if not leaves:
                break
            leaf = min(leaves, key=lambda n: n.last)
            self.token_to_kv_pool_allocator.free(leaf.value)
            del leaf.parent.children[leaf.key[: self.page_size]]
            self.evictable_size_ -= len(leaf.key)
            done += len(leaf.key)
        return done

    def checkpoint(self, req):
        """Insert what the request computed, give back its duplicates of cached pages, move its
        lock onto the node it now ends on (what SGLang's RadixCache.checkpoint does)."""
        ps = self.page_size
        res = self.insert(req.tokens, req.row)
        dup = req.row[req.protected : res.prefix_len]
        self.token_to_kv_pool_allocator.free(dup)
        n, node = self.match_prefix(req.tokens[: len(req.tokens) // ps * ps])
        path = []
        walk = node
        while walk is not self.root_node:
            path.append(walk.value)
            walk = walk.parent
        req.row[:n] = np.concatenate(path[::-1]) if path else req.row[:0]
        self.dec_lock_ref(req.node)
        self.inc_lock_ref(node)
        req.node, req.protected = node, n

    def _nodes(self):
        stack = list(self.root_node.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
