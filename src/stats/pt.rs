//! Reader of the official `torch.save` statistics files (filled in below).
