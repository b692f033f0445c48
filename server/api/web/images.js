// Image attachments: files (picker, drop, paste) → data URIs the server accepts.
// Photos larger than MAX_SIDE on a side are downscaled in the browser first (canvas),
// so a phone picture does not send megabytes for a vision tower that sees ~900 px.

export const MAX_SIDE = 896; // px
const ACCEPTED = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
const JPEG_QUALITY = 0.9;

export function isImage(file) {
  return ACCEPTED.includes(file.type);
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** A data URI for `file`: the file as is when it fits MAX_SIDE, else a downscaled JPEG
 * (white behind any transparency). Rejects when the browser cannot decode the file. */
export async function toDataURI(file) {
  const bitmap = await createImageBitmap(file);
  try {
    const { width, height } = bitmap;
    if (Math.max(width, height) <= MAX_SIDE) return await readAsDataURL(file);
    const scale = MAX_SIDE / Math.max(width, height);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(width * scale));
    canvas.height = Math.max(1, Math.round(height * scale));
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", JPEG_QUALITY);
  } finally {
    bitmap.close();
  }
}
