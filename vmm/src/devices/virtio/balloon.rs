//! virtio-balloon (work in progress).
