package refetch.bench.peer;

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** GET {source}/entity/{id} with the JDK client, retrying until the source answers 200. */
public final class SourceClient {
    /** A fetched entity. */
    public record Fetched(String body, long version) {}

    private static final Pattern VERSION = Pattern.compile("\"version\":(\\d+)");
    private final HttpClient client = HttpClient.newBuilder()
            .version(HttpClient.Version.HTTP_1_1)
            .connectTimeout(Duration.ofSeconds(5))
            .build();
    private final String base;

    public SourceClient(String base) {
        this.base = base;
    }

    public Fetched fetch(String id) throws InterruptedException {
        HttpRequest req = HttpRequest.newBuilder(URI.create(base + "/entity/" + id))
                .timeout(Duration.ofSeconds(30)).GET().build();
        while (true) {
            try {
                HttpResponse<String> resp = client.send(req, HttpResponse.BodyHandlers.ofString());
                if (resp.statusCode() == 200) {
                    Matcher m = VERSION.matcher(resp.body());
                    if (m.find()) {
                        return new Fetched(resp.body(), Long.parseLong(m.group(1)));
                    }
                }
            } catch (java.io.IOException e) {
                // retry below
            }
            Thread.sleep(100);
        }
    }
}
