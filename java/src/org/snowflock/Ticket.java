package org.snowflock;

/**
 * A reservation of clone slots, as {@link SnowFlock#requestTicket(int)} returns it.
 *
 * @param id what the other calls pass to sfld
 * @param granted clone slots granted, 1 &lt;= granted &lt;= requested
 * @param requested what was asked for
 */
public record Ticket(String id, int granted, int requested) {}
