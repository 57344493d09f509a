// A streamed images.generate or images.edit (`input.edit`): the events as they came, and,
// when the stream fails midway, the error the SDK raised after them.
//   input: {request: {...}, edit?: {images: [base64...], mask?: base64}}
export default async ({ client, input, describeError, toFile }) => {
  const openai = client();
  const request = { ...input.request };
  if (input.edit) {
    request.image = await Promise.all(
      input.edit.images.map((data, i) => toFile(Buffer.from(data, "base64"), `image-${i}.png`, { type: "image/png" })),
    );
    if (input.edit.images.length === 1) request.image = request.image[0];
    if (input.edit.mask) request.mask = await toFile(Buffer.from(input.edit.mask, "base64"), "mask.png", { type: "image/png" });
  }
  const events = [];
  try {
    const stream = input.edit ? await openai.images.edit(request) : await openai.images.generate(request);
    for await (const event of stream) events.push(event);
    return { events, error: null };
  } catch (error) {
    return { events, error: describeError(error) };
  }
};
