/** An error about an image's content or its use, carrying a one-line message in QEMU's words. */
export class ImageError extends Error {
  constructor(message: string, readonly errno?: string) {
    super(message);
    this.name = 'ImageError';
  }
}

/** Raised when metadata would be (or was found) inconsistent; the image is then marked corrupt. */
export class CorruptionError extends ImageError {
  constructor(message: string) {
    super(message, 'EIO');
    this.name = 'CorruptionError';
  }
}
