//! HarMA adapters (MMadapter, BiShareAdapter, gates) plugged into `harma_clip::BlockHook`: to be built (see the issues).
