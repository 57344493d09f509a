// images.edit with files (one as `image`, several as `image[]`, as the SDK sends them) and an
// optional mask; input: {request: {...}, images: [base64...], mask?: base64}.
export default async ({ client, input, attempt, toFile }) => {
  const files = await Promise.all(
    input.images.map((data, i) => toFile(Buffer.from(data, "base64"), `image-${i}.png`, { type: "image/png" })),
  );
  const request = { ...input.request, image: files.length === 1 ? files[0] : files };
  if (input.mask) request.mask = await toFile(Buffer.from(input.mask, "base64"), "mask.png", { type: "image/png" });
  return attempt(() => client().images.edit(request));
};
