// images.generate with `input` as the request; returns the parsed answer, its request id
// and the gateway's headers.
export default async ({ client, input }) => {
  const { data: result, response, request_id: requestID } = await client().images.generate(input).withResponse();
  return {
    result,
    requestID,
    headers: Object.fromEntries(response.headers.entries()),
  };
};
